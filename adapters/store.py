"""The adapter store: immutable, content-addressed adapter versions on disk, shared by all replicas.

Layout::

    <root>/index.json                       names -> versions and the active version; registry copies
    <root>/<name>/v<N>-<digest[:12]>/       adapter_config.json, adapter_model.safetensors (never modified)
    <root>/.registry/<name>/v<N>-<digest[:12]>/   a registry version's files, fetched for an alias

Importing a directory whose content differs from every stored version of that name creates version N+1;
importing identical content re-activates the existing version. Copies of registry versions keep the
registry's numbers in a section of their own, so a name loaded directly here (``tsugiki tune``,
``POST /v1/adapters``) and registered in the registry never compete for a number. Writers serialise on an
``fcntl`` lock and replace ``index.json`` atomically, so replicas on one filesystem (or a shared volume) see one
consistent state; readers notice changes by the index file's mtime, a single ``stat`` per lookup.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tsugiki.adapters.format import (
    COMPANION_FILES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterRef,
    artifact_files,
    content_digest,
)
from tsugiki.errors import AdapterError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def inside_roots(path: str, roots: Sequence[Path], *, param: str = "path", what: str = "adapter path") -> Path:
    """``path`` resolved (symlinks too), refused unless absolute and inside one of ``roots``: the one guard for
    every API call that names a file on the server (adapter loads, registry registrations, training data)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise InvalidRequestError(f"{what} {path!r} must be absolute", param=param)
    real = p.resolve()
    if not any(real == r or r in real.parents for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PermissionDeniedError(
            f"{what} {path!r} is outside the allowed adapter roots ({allowed}); move it there or add its "
            "directory to adapters.roots", param=param, code="path_not_allowed")
    return real


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or "@" in name:
        raise InvalidRequestError(
            f"adapter name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit", param="name", code="invalid_adapter_name")
    return name


@dataclass(frozen=True)
class AdapterRecord:
    """One stored version, as listed by the API."""

    name: str
    version: int
    digest: str
    path: str
    created: float
    source: str
    active: bool

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.version, self.digest)


class AdapterStore:
    """Versioned adapter artifacts under ``root``.

    Args:
        root: the store directory (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._index_path = self.root / "index.json"
        self._stamp: tuple[int, int] | None = None
        self._index: dict[str, Any] = {"adapters": {}}
        # The engine thread and request threads share one store object; the lock keeps the cached index whole.
        self._mutex = threading.RLock()

    # ---- reading -------------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        with self._mutex:
            return self._load_locked()

    def _load_locked(self) -> dict[str, Any]:
        try:
            st = self._index_path.stat()
        except FileNotFoundError:
            self._stamp, self._index = None, {"adapters": {}}
            return self._index
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._index = json.loads(self._index_path.read_text())
            self._stamp = stamp
        return self._index

    def resolve(self, name: str) -> AdapterRef | None:
        """The active version of ``name``, or None when there is no such adapter (or it was unloaded)."""
        entry = self._load()["adapters"].get(name)
        if not entry or entry.get("active") is None:
            return None
        v = entry["versions"][str(entry["active"])]
        return AdapterRef(name, int(entry["active"]), v["digest"])

    def require(self, name: str) -> AdapterRef:
        ref = self.resolve(name)
        if ref is None:
            raise ModelNotFoundError(f"adapter {name!r} is not loaded; GET /v1/models lists what is served",
                                     param="model")
        return ref

    def _entry_of(self, ref: AdapterRef) -> dict[str, Any] | None:
        """The index entry holding exactly ``ref`` (number and digest): loaded directly, or a registry copy (an
        index written before registry copies had a section of their own holds them among the direct ones)."""
        index = self._load()
        for section in ("adapters", "registry"):
            v = index.get(section, {}).get(ref.name, {}).get("versions", {}).get(str(ref.version))
            if v is not None and v["digest"] == ref.digest and (self.root / v["path"]).is_dir():
                return v  # type: ignore[no-any-return]
        return None

    def path_of(self, ref: AdapterRef) -> Path:
        v = self._entry_of(ref)
        if v is None:
            raise ModelNotFoundError(f"adapter version {ref.key} is not in the store", param="model")
        return self.root / v["path"]

    def records(self, *, include_inactive: bool = False) -> list[AdapterRecord]:
        out = []
        for name, entry in sorted(self._load()["adapters"].items()):
            for ver, v in sorted(entry["versions"].items(), key=lambda kv: int(kv[0])):
                active = entry.get("active") == int(ver)
                if active or include_inactive:
                    out.append(AdapterRecord(name=name, version=int(ver), digest=v["digest"], path=v["path"],
                                             created=v["created"], source=v["source"], active=active))
        return out

    def active_refs(self) -> dict[str, AdapterRef]:
        return {r.name: r.ref for r in self.records()}

    # ---- writing -------------------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with self._mutex, open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = None
            index = self._load()
            yield index
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(index, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._index_path)
            self._stamp = None

    def put(self, name: str, src: str | Path, *, digest: str | None = None, version: int | None = None,
            activate: bool = True) -> AdapterRef:
        """Import the adapter directory ``src`` under ``name`` (and make that version active unless ``activate``
        is False).

        Identical content to an existing version reuses that version; new content becomes version N+1, or
        ``version`` when given: the registry numbers the versions of the adapters it manages, and a copy of one
        is kept under that number (a different digest under a taken number is an error), in a section of its own
        (never active: aliases route to it).
        """
        check_name(name)
        src = Path(src)
        artifact_files(src)
        digest = digest or content_digest(src)
        registry = version is not None
        if registry and activate:
            raise ValueError("a registry version's copy is never the active version of a loaded adapter")
        with self._locked() as index:
            section = index.setdefault("registry", {}) if registry else index["adapters"]
            entry = section.setdefault(name, {"versions": {}, "active": None})
            for ver, v in entry["versions"].items():
                if v["digest"] == digest and (self.root / v["path"]).is_dir() and version in (None, int(ver)):
                    if activate:
                        entry["active"] = int(ver)
                    return AdapterRef(name, int(ver), digest)
            if version is not None and str(version) in entry["versions"]:
                raise AdapterError(f"adapter {name!r} version {version} is already stored with different content "
                                   f"(digest {entry['versions'][str(version)]['digest'][:12]}, not {digest[:12]})",
                                   param="version")
            if version is None:
                version = max((int(v) for v in entry["versions"]), default=0) + 1
            rel = f"{'.registry/' if registry else ''}{name}/v{version}-{digest[:12]}"
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
            try:
                for f in (CONFIG_FILE, WEIGHTS_FILE):
                    shutil.copyfile(src / f, tmp / f)
                for f in COMPANION_FILES:  # card, drift reference and lexicon travel with the weights
                    if (src / f).is_file():
                        shutil.copyfile(src / f, tmp / f)
                if content_digest(tmp) != digest:
                    raise AdapterError(f"adapter at {str(src)!r} changed while it was being imported; retry",
                                       param="path")
                if dest.exists():  # left by an import that crashed before the index was written
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            entry["versions"][str(version)] = {"digest": digest, "path": rel, "created": time.time(),
                                               "source": str(src)}
            if activate:
                entry["active"] = version
            return AdapterRef(name, version, digest)

    def has(self, ref: AdapterRef) -> bool:
        """Whether this exact version (name, number and digest) is on disk here."""
        return self._entry_of(ref) is not None

    def deactivate(self, name: str) -> AdapterRef:
        """Stop serving ``name`` (its versions stay on disk for audit and rollback)."""
        with self._locked() as index:
            entry = index["adapters"].get(name)
            if not entry or entry.get("active") is None:
                raise ModelNotFoundError(f"adapter {name!r} is not loaded", param="name")
            ver = int(entry["active"])
            entry["active"] = None
            return AdapterRef(name, ver, entry["versions"][str(ver)]["digest"])

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records()]
