"""Where adapter artifacts live: content-addressed, immutable copies on a local volume or in S3.

The registry keeps metadata; an :class:`ArtifactStore` keeps the files. Every artifact is stored under
``<name>/<digest>/`` and its URI ends in that digest, so a URI names exactly one content: :meth:`ArtifactStore.fetch`
recomputes :func:`~tsugiki.adapters.format.content_digest` on what it downloaded and refuses anything else
(bit rot, a truncated download, a hand-edited file).

Only the adapter's own files travel: ``adapter_config.json``, ``adapter_model.safetensors`` and the optional
companions (``model_card.json``, ``drift_reference.safetensors``, ``lexicon.json``; ``format.COMPANION_FILES``).
Nothing is unpickled and no other file name is ever written or read, whatever a remote listing says.

Publication is atomic in both stores: :class:`LocalArtifacts` writes into a temporary directory and renames it into
place; :class:`S3Artifacts` uploads the files and then a ``_COMPLETE`` marker object, which readers require, so a
half-finished upload is invisible.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tsugiki.adapters.format import COMPANION_FILES, CONFIG_FILE, WEIGHTS_FILE, artifact_files, content_digest
from tsugiki.adapters.store import check_name
from tsugiki.errors import AdapterError, ArtifactStoreError, ConfigError

ARTIFACT_FILES = (CONFIG_FILE, WEIGHTS_FILE, *COMPANION_FILES)  # the only names ever copied; companions optional
COMPLETE_MARKER = "_COMPLETE"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore(ABC):
    """Immutable adapter artifacts addressed by ``(name, digest)``.

    Subclasses only move bytes; checking the adapter's files before upload and its digest after download is shared
    here, so every backend gives the same guarantee.
    """

    @abstractmethod
    def put(self, name: str, src_dir: Path, digest: str) -> str:
        """Store the adapter directory ``src_dir`` (whose content digest is ``digest``); return its URI.

        Idempotent: content already stored under ``(name, digest)`` is not uploaded again.
        """

    @abstractmethod
    def fetch(self, uri: str, dest_dir: Path) -> Path:
        """Download the artifact at ``uri`` into ``dest_dir``, verify its digest and return ``dest_dir``.

        Raises :class:`AdapterError` naming ``uri`` when the content does not match the digest in the URI, or when
        there is no complete artifact there.
        """

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether a complete artifact is stored at ``uri``."""

    # ---- shared by the backends ----------------------------------------------------------------------------------
    @staticmethod
    def _source_files(src_dir: Path, digest: str) -> list[str]:
        """The file names to store from the adapter directory ``src_dir``, after checking it and ``digest``'s form."""
        if not _DIGEST_RE.match(digest):
            raise AdapterError(f"digest {digest!r} is not a sha256 hex digest; compute it with content_digest()",
                               param="digest")
        artifact_files(src_dir)
        return [f for f in ARTIFACT_FILES if (src_dir / f).is_file()]

    @staticmethod
    def _check_digest(src_dir: Path, digest: str) -> None:
        """Refuse to store content under a digest that is not its own (it would poison the content address)."""
        actual = content_digest(src_dir)
        if actual != digest:
            raise AdapterError(f"adapter at {str(src_dir)!r} has digest {actual}, not the {digest} it is being stored "
                               "under; did it change after the digest was computed?", param="digest",
                               code="corrupt_adapter")

    @staticmethod
    def _install(tmp: Path, dest_dir: Path, uri: str, digest: str) -> Path:
        """Verify the download in ``tmp`` and move it to ``dest_dir``; ``tmp`` is gone afterwards either way."""
        try:
            try:
                actual = content_digest(tmp)
            except AdapterError as e:
                raise AdapterError(f"artifact {uri} is unreadable: {e.message}", param="uri",
                                   code="corrupt_adapter") from e
            if actual != digest:
                raise AdapterError(f"artifact {uri} is corrupt: its content digest is {actual}, expected {digest}",
                                   param="uri", code="corrupt_adapter")
            if not dest_dir.exists():
                dest_dir.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest_dir)
            else:  # an existing directory (a cache slot): each file is replaced atomically
                dest_dir.mkdir(parents=True, exist_ok=True)
                got = os.listdir(tmp)
                for f in got:
                    os.replace(tmp / f, dest_dir / f)
                for f in set(COMPANION_FILES) - set(got):  # a stale one must not stay (a lexicon changes answers)
                    (dest_dir / f).unlink(missing_ok=True)
            return dest_dir
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _split_tail(path: str, uri: str) -> tuple[str, str]:
    """``(name, digest)`` from the last two segments of an artifact URI's path."""
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or not _DIGEST_RE.match(parts[-1]):
        raise AdapterError(f"artifact URI {uri!r} does not end in <name>/<sha256 digest>", param="uri",
                           code="invalid_artifact_uri")
    return check_name(parts[-2]), parts[-1]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalArtifacts(ArtifactStore):
    """Artifacts in a directory: ``<root>/<name>/<digest>/<files>``, URIs ``file:///abs/root/<name>/<digest>``.

    Suits one machine or a shared POSIX volume. Files are fsynced before the directory is renamed into place, so a
    crash leaves either the whole artifact or a ``.put-*`` temporary directory that nobody reads.

    Args:
        root: the artifact directory (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def uri_for(self, name: str, digest: str) -> str:
        return (self.root / check_name(name) / digest).as_uri()

    def put(self, name: str, src_dir: Path, digest: str) -> str:
        check_name(name)
        src_dir = Path(src_dir)
        files = self._source_files(src_dir, digest)
        dest = self.root / name / digest
        if self._complete(dest):
            return dest.as_uri()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".put-", dir=dest.parent))
        try:
            for f in files:
                shutil.copyfile(src_dir / f, tmp / f)
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            self._check_digest(tmp, digest)  # the copy, not the source: what is published is what was checked
            try:
                os.replace(tmp, dest)
            except OSError:
                # Another writer published the same content first; content addressing makes theirs as good as ours.
                if not self._complete(dest):
                    raise
            _fsync_dir(dest.parent)
        except OSError as e:
            raise ArtifactStoreError(f"could not store adapter {name!r} under {self.root}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest.as_uri()

    def fetch(self, uri: str, dest_dir: Path) -> Path:
        src, digest = self._path_of(uri)
        if not self._complete(src):
            raise AdapterError(f"artifact {uri} does not exist", param="uri", code="adapter_not_found")
        dest_dir = Path(dest_dir)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest_dir.parent))
        try:
            for f in ARTIFACT_FILES:
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactStoreError(f"could not copy artifact {uri}: {e}") from e
        return self._install(tmp, dest_dir, uri, digest)

    def exists(self, uri: str) -> bool:
        return self._complete(self._path_of(uri)[0])

    @staticmethod
    def _complete(path: Path) -> bool:
        return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()

    @staticmethod
    def _path_of(uri: str) -> tuple[Path, str]:
        u = urlparse(uri)
        if u.scheme != "file" or u.netloc not in ("", "localhost"):
            raise AdapterError(f"artifact URI {uri!r} is not a local file:/// URI", param="uri",
                               code="invalid_artifact_uri")
        path = unquote(u.path)
        _, digest = _split_tail(path, uri)
        return Path(path), digest


class S3Artifacts(ArtifactStore):
    """Artifacts in S3 or an S3-compatible store (MinIO, Ceph): keys ``<prefix>/<name>/<digest>/<file>``.

    An artifact counts as present only once its ``_COMPLETE`` marker exists; the marker is written after every file,
    so a reader never sees a partial upload, and an interrupted upload is simply redone by the next :meth:`put`.
    Large weights go up as multipart uploads (boto3's transfer manager).

    Args:
        uri: ``s3://bucket`` or ``s3://bucket/prefix``.
        endpoint_url: for S3-compatible services; None means AWS.
        client: a ready boto3 S3 client (tests, custom sessions); by default one is built from the environment's
            AWS configuration. boto3 is only needed when no client is given.
    """

    def __init__(self, uri: str, *, endpoint_url: str | None = None, client: Any | None = None) -> None:
        u = urlparse(uri)
        if u.scheme != "s3" or not u.netloc:
            raise ConfigError(f"S3 artifact location {uri!r} must look like s3://bucket or s3://bucket/prefix")
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        if client is None:
            try:
                import boto3
            except ImportError as e:
                raise ConfigError('S3 artifact storage needs boto3: pip install "tsugiki[s3]"') from e
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self._s3 = client

    def _key(self, name: str, digest: str, file: str = "") -> str:
        return "/".join(p for p in (self.prefix, name, digest, file) if p)

    def uri_for(self, name: str, digest: str) -> str:
        return f"s3://{self.bucket}/{self._key(check_name(name), digest)}"

    def put(self, name: str, src_dir: Path, digest: str) -> str:
        check_name(name)
        src_dir = Path(src_dir)
        files = self._source_files(src_dir, digest)
        uri = self.uri_for(name, digest)
        if self._has_marker(self.bucket, self._key(name, digest), uri):
            return uri
        self._check_digest(src_dir, digest)  # fetch() re-checks the download; this keeps bad content out of S3
        marker = json.dumps({"digest": digest, "files": files}).encode()
        with _BotoErrors(uri):
            for f in files:
                self._s3.upload_file(str(src_dir / f), self.bucket, self._key(name, digest, f))
            self._s3.put_object(Bucket=self.bucket, Key=self._key(name, digest, COMPLETE_MARKER), Body=marker,
                                ContentType="application/json")
        return uri

    def fetch(self, uri: str, dest_dir: Path) -> Path:
        bucket, base, digest = self._parse(uri)
        if not self._has_marker(bucket, base, uri):
            raise AdapterError(f"artifact {uri} does not exist or its upload never completed (no {COMPLETE_MARKER})",
                               param="uri", code="adapter_not_found")
        dest_dir = Path(dest_dir)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest_dir.parent))
        try:
            with _BotoErrors(uri):
                for f in ARTIFACT_FILES:
                    if f in COMPANION_FILES and not self._head(bucket, f"{base}/{f}", uri):
                        continue  # card and drift reference are optional; config and weights must be there
                    self._s3.download_file(bucket, f"{base}/{f}", str(tmp / f))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._install(tmp, dest_dir, uri, digest)

    def exists(self, uri: str) -> bool:
        bucket, base, _ = self._parse(uri)
        return self._has_marker(bucket, base, uri)

    # ---- internals -----------------------------------------------------------------------------------------------
    @staticmethod
    def _parse(uri: str) -> tuple[str, str, str]:
        u = urlparse(uri)
        if u.scheme != "s3" or not u.netloc:
            raise AdapterError(f"artifact URI {uri!r} is not an s3:// URI", param="uri", code="invalid_artifact_uri")
        _, digest = _split_tail(u.path, uri)
        return u.netloc, u.path.strip("/"), digest

    def _has_marker(self, bucket: str, base: str, uri: str) -> bool:
        return self._head(bucket, f"{base}/{COMPLETE_MARKER}", uri)

    def _head(self, bucket: str, key: str, uri: str) -> bool:
        with _BotoErrors(uri, missing_ok=True) as found:
            self._s3.head_object(Bucket=bucket, Key=key)
        return found.ok


class _BotoErrors:
    """Maps botocore errors to project errors: a missing object is the caller's problem, anything else the backend's.

    With ``missing_ok`` a 404 is swallowed and reported through ``ok`` instead (for existence checks).
    """

    def __init__(self, uri: str, *, missing_ok: bool = False) -> None:
        self.uri = uri
        self.missing_ok = missing_ok
        self.ok = True

    def __enter__(self) -> _BotoErrors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            return False
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:  # an injected non-boto client: its errors pass through unchanged
            return False
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                if self.missing_ok and code != "NoSuchBucket":
                    self.ok = False
                    return True
                raise AdapterError(f"artifact {self.uri} is missing in S3 ({code}: {err.get('Message', '')})",
                                   param="uri", code="adapter_not_found") from exc
            raise ArtifactStoreError(f"S3 refused an operation on {self.uri}: {code} {err.get('Message', '')}".strip()
                                     ) from exc
        if isinstance(exc, BotoCoreError):
            raise ArtifactStoreError(f"S3 is unreachable for {self.uri}: {exc}") from exc
        try:
            from boto3.exceptions import Boto3Error  # upload_file wraps ClientError in S3UploadFailedError
        except ImportError:
            return False
        if isinstance(exc, Boto3Error):
            raise ArtifactStoreError(f"S3 transfer failed for {self.uri}: {exc}") from exc
        return False


def artifacts_from_uri(uri: str, **kw: Any) -> ArtifactStore:
    """The artifact store for a location: ``s3://bucket/prefix``, ``file:///abs/dir`` or a plain directory path.

    Keyword arguments go to the store's constructor (``endpoint_url``/``client`` for S3).
    """
    u = urlparse(uri)
    if u.scheme == "s3":
        return S3Artifacts(uri, **kw)
    if u.scheme == "file":
        return LocalArtifacts(unquote(u.path), **kw)
    if u.scheme == "":
        return LocalArtifacts(uri, **kw)
    raise ConfigError(f"artifact location {uri!r} has unsupported scheme {u.scheme!r}; supported: s3://bucket/prefix, "
                      "file:///abs/dir or a plain directory path")
