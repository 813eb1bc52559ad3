"""Alias routing on a serving replica: which adapter version answers a request that names an alias.

Replicas never open the registry database (it lives with the controller, on one host); they hold a snapshot of
the alias table and of the routed versions' identities, fetched from the controller at most every ``refresh_s``
seconds, so a rollout's new weights reach every replica within that time. Routing is the registry's pure,
sticky :func:`~tsugiki.adapters.registry.route`. A routed version's files come from the registry's artifact store
(a directory, or S3 on a cluster) into this node's :class:`~tsugiki.adapters.store.AdapterStore` the first time
they are needed, under the registry's version number, so the engine loads them like any stored version.

Snapshot shape (plain JSON, see :func:`snapshot`)::

    {"aliases": [{"alias", "routes", "shadow", "shadow_share", "capture_rate", "capture_retention",
                  "generation", "updated"}, ...],
     "versions": {"name@vN": {"digest": ..., "artifact_uri": ...}, ...}}
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tsugiki.adapters.artifacts import ArtifactStore
from tsugiki.adapters.format import AdapterRef
from tsugiki.adapters.registry import Alias, Registry, in_shadow, parse_key, route
from tsugiki.adapters.store import AdapterStore
from tsugiki.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 2.0  # longest a request waits for a fresh alias table before using the last one


def snapshot(registry: Registry) -> dict[str, Any]:
    """What replicas need to route: every alias, and the identity of each version an alias routes or shadows to."""
    aliases = registry.aliases()
    keys = {k for a in aliases for k in a.routes} | {a.shadow for a in aliases if a.shadow}
    versions = {}
    for key in sorted(keys):
        rec = registry.get(*parse_key(key))
        versions[key] = {"digest": rec.digest, "artifact_uri": rec.artifact_uri}
    return {"aliases": [asdict(a) for a in aliases], "versions": versions}


class AliasRouter:
    """A replica's view of the aliases.

    Args:
        source: async callable returning a :func:`snapshot` (a controller call under Ray).
        artifacts: the registry's artifact store (where routed versions' files come from).
        store: this node's adapter store (where they are materialised).
        refresh_s: how stale the snapshot may get.
    """

    def __init__(self, source: Callable[[], Awaitable[dict[str, Any]]], artifacts: ArtifactStore | None,
                 store: AdapterStore, *, refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.artifacts = artifacts
        self.store = store
        self.refresh_s = refresh_s
        self._clock = clock
        self._aliases: dict[str, Alias] = {}
        self._versions: dict[str, dict[str, str]] = {}
        self._read_at = -float("inf")
        self.routed: set[str] = set()  # slots of the current table's versions (see _routed), set on each refresh
        self._refreshing: asyncio.Lock | None = None
        self._fetch_lock = threading.Lock()

    async def aliases(self) -> dict[str, Alias]:
        """The alias table, at most ``refresh_s`` old (the last good one while the controller is unreachable)."""
        if self._clock() - self._read_at >= self.refresh_s:
            if self._refreshing is None:
                self._refreshing = asyncio.Lock()
            async with self._refreshing:
                if self._clock() - self._read_at >= self.refresh_s:
                    try:  # bounded: a restarting controller must not hold up requests
                        snap = await asyncio.wait_for(self.source(), timeout=SNAPSHOT_TIMEOUT_S)
                        self._aliases = {a["alias"]: Alias(**a) for a in snap["aliases"]}
                        self._versions = dict(snap["versions"])
                        self.routed = self._routed()
                    except Exception as e:  # serve with the last table; the controller may be restarting
                        logger.warning(f"alias table refresh failed, keeping the last one: {type(e).__name__}: {e}")
                    self._read_at = self._clock()
        return self._aliases

    async def get(self, name: str) -> Alias | None:
        return (await self.aliases()).get(name)

    def _routed(self) -> set[str]:
        """Slots (:attr:`AdapterRef.slot`) of the versions some alias routes or shadows to (the engine keeps them
        resident)."""
        keys: set[str] = set()
        for a in self._aliases.values():
            keys.update(k for k, w in a.routes.items() if w > 0)
            if a.shadow and a.shadow_share > 0:
                keys.add(a.shadow)
        return {self.ref(k).slot for k in keys if k in self._versions}

    @staticmethod
    def pick(alias: Alias, caller_key: str) -> str:
        """The version key for this caller (sticky; see :func:`~tsugiki.adapters.registry.route`)."""
        return route(alias, caller_key)

    @staticmethod
    def shadow_of(alias: Alias, request_id: str) -> str | None:
        """The shadow version this request is copied to, if it is in the shadowed sample."""
        return alias.shadow if in_shadow(alias, request_id) else None

    def ref(self, key: str) -> AdapterRef:
        v = self._versions.get(key)
        if v is None:
            raise ModelNotFoundError(f"version {key} is not in this replica's alias table yet; retry", param="model")
        name, version = parse_key(key)
        return AdapterRef(name, version, v["digest"])

    def is_local(self, key: str) -> bool:
        return key in self._versions and self.store.has(self.ref(key))

    async def resolve(self, key: str) -> AdapterRef:
        """The stored ref of version ``key``: at once if this node has it, else downloaded in a worker thread."""
        return self.ref(key) if self.is_local(key) else await asyncio.to_thread(self.local, key)

    def local(self, key: str) -> AdapterRef:
        """The stored ref of version ``key``, downloading its files first if this node lacks them.

        Blocking (file copies or an object-store download): call it from a worker thread.
        """
        v = self._versions.get(key)  # read once: the event loop may swap in a newer snapshot meanwhile
        if v is None:
            raise ModelNotFoundError(f"version {key} is not in this replica's alias table yet; retry", param="model")
        name, version = parse_key(key)
        ref, uri = AdapterRef(name, version, v["digest"]), v["artifact_uri"]
        if self.artifacts is None:
            raise ModelNotFoundError(f"version {key} is not on this node and no artifact store is configured",
                                     param="model")
        with self._fetch_lock:  # one download per version on this replica
            if not self.store.has(ref):
                with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.store.root) as tmp:
                    path = self.artifacts.fetch(uri, Path(tmp) / "artifact")
                    self.store.put(ref.name, path, digest=ref.digest, version=ref.version, activate=False)
        return ref
