import threading
from pathlib import Path

import pytest

from tsugiki.adapters.cache import AdapterCache
from tsugiki.adapters.format import AdapterRef
from tsugiki.adapters.store import AdapterStore
from tsugiki.errors import InvalidRequestError, ModelNotFoundError


def test_versions_are_immutable_and_content_addressed(tmp_path: Path, lora_all: Path, lora_other: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    v1 = store.put("intent", lora_all)
    assert (v1.name, v1.version) == ("intent", 1)
    assert store.put("intent", lora_all) == v1  # same content: same version
    v2 = store.put("intent", lora_other)
    assert v2.version == 2 and v2.digest != v1.digest
    assert store.resolve("intent") == v2
    assert store.put("intent", lora_all) == v1  # re-activating an old version does not copy it again
    assert store.resolve("intent") == v1
    # another process (a second replica) sees the same state
    other = AdapterStore(tmp_path / "store")
    assert other.resolve("intent") == v1
    assert [r.version for r in other.records(include_inactive=True)] == [1, 2]
    assert (store.path_of(v2) / "adapter_model.safetensors").read_bytes() == \
        (lora_other / "adapter_model.safetensors").read_bytes()


def test_registry_copies_keep_the_registrys_numbers_apart_from_directly_loaded_versions(
        tmp_path: Path, lora_all: Path, lora_other: Path, lora_qv: Path) -> None:
    """`tsugiki tune --name support` twice (support@v1, @v2 here), then the second result registered: the
    registry calls it support@v1. Its copy on this node keeps that number without meeting the direct v1."""
    from tsugiki.adapters.format import content_digest
    from tsugiki.errors import AdapterError

    store = AdapterStore(tmp_path / "store")
    d1, d2 = store.put("support", lora_all), store.put("support", lora_other)

    def fetch(src: Path, version: int) -> AdapterRef:  # as the alias router does
        return store.put("support", src, digest=content_digest(src), version=version, activate=False)

    r1 = fetch(lora_other, 1)
    assert r1.key == d1.key and r1.digest == d2.digest != d1.digest
    assert store.has(d1) and store.has(r1) and store.path_of(d1) != store.path_of(r1)
    assert ".registry" in str(store.path_of(r1)) and store.resolve("support") == d2  # the loaded name is unchanged
    assert fetch(lora_other, 1) == r1  # fetched again: the same copy
    with pytest.raises(AdapterError, match="version 1 is already stored with different content"):
        fetch(lora_qv, 1)  # the registry's own numbers stay checked
    assert fetch(lora_all, 2).digest == d1.digest and store.put("support", lora_qv).version == 3
    with pytest.raises(ValueError):
        store.put("support", lora_qv, version=4)  # a registry copy is never made the active version
    # an entry whose files are gone (deleted by hand) does not hide a good copy of the same version and content
    import shutil

    other = AdapterStore(tmp_path / "other")
    gone = other.put("x", lora_all)
    shutil.rmtree(other.path_of(gone))
    assert not other.has(gone)
    copy = other.put("x", lora_all, digest=gone.digest, version=gone.version, activate=False)
    assert copy == gone and other.has(copy) and ".registry" in str(other.path_of(copy))


def test_deactivate_and_errors(tmp_path: Path, lora_all: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    store.put("a", lora_all)
    store.deactivate("a")
    assert store.resolve("a") is None
    with pytest.raises(ModelNotFoundError, match="'a' is not loaded"):
        store.deactivate("a")
    with pytest.raises(ModelNotFoundError, match="GET /v1/models"):
        store.require("a")
    with pytest.raises(InvalidRequestError, match="adapter name '../x' is invalid"):
        store.put("../x", lora_all)


def test_concurrent_writers_lose_nothing(tmp_path: Path, lora_all: Path) -> None:
    errors = []

    def put(i: int) -> None:
        try:
            AdapterStore(tmp_path / "store").put(f"n{i}", lora_all)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(AdapterStore(tmp_path / "store").active_refs()) == sorted(f"n{i}" for i in range(8))


def test_lru_cache_evicts_least_recent_unpinned() -> None:
    evicted: list[str] = []
    cache = AdapterCache(2, lambda r: evicted.append(r.name))
    a, b, c = (AdapterRef(n, 1, n) for n in "abc")
    cache.add(a)
    cache.add(b)
    cache.touch(a)
    assert cache.add(c) == [b] and evicted == ["b"]
    cache.pin(a)
    cache.pin(c)
    assert not cache.has_room()
    with pytest.raises(RuntimeError, match="pinned"):
        cache.add(b)
    cache.unpin(c)
    assert cache.has_room()
    cache.add(b)
    assert evicted == ["b", "c"] and a in cache and b in cache
    with pytest.raises(ValueError, match="capacity should be a positive integer"):
        AdapterCache(0, lambda r: None)
