"""The per-replica adapter cache: at most ``capacity`` adapter versions in memory, least recently used evicted.

Adapters that running sequences use are pinned and never evicted; when every slot is pinned a new adapter
waits (the engine keeps its requests queued) instead of evicting weights in use. The eviction hook frees the
adapter's tensors in the model's LoRA layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from tsugiki.adapters.format import AdapterRef


class AdapterCache:
    """LRU bookkeeping over adapter versions (keyed by :attr:`AdapterRef.slot`: version and content).

    Args:
        capacity: most adapter versions resident at once.
        on_evict: called with the evicted ref; must release its memory.
    """

    def __init__(self, capacity: int, on_evict: Callable[[AdapterRef], None]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity should be a positive integer but the value passed is {capacity}")
        self.capacity = capacity
        self._on_evict = on_evict
        self._lru: OrderedDict[str, AdapterRef] = OrderedDict()
        self._pins: dict[str, int] = {}

    def __contains__(self, ref: AdapterRef) -> bool:
        return ref.slot in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def refs(self) -> list[AdapterRef]:
        return list(self._lru.values())

    def touch(self, ref: AdapterRef) -> None:
        self._lru.move_to_end(ref.slot)

    def has_room(self) -> bool:
        """True when a new adapter can be added now (a free slot, or an unpinned one to evict)."""
        return len(self._lru) < self.capacity or any(self._pins.get(k, 0) == 0 for k in self._lru)

    def add(self, ref: AdapterRef) -> list[AdapterRef]:
        """Record ``ref`` as resident, evicting least-recently-used unpinned entries. Returns the evicted refs."""
        if ref.slot in self._lru:
            self.touch(ref)
            return []
        evicted = []
        while len(self._lru) >= self.capacity:
            victim = next((k for k in self._lru if self._pins.get(k, 0) == 0), None)
            if victim is None:
                raise RuntimeError("every cached adapter is pinned; check has_room() before add()")
            evicted.append(self.remove(self._lru[victim]))
        self._lru[ref.slot] = ref
        return evicted

    def remove(self, ref: AdapterRef) -> AdapterRef:
        """Drop ``ref`` now (unload), calling the eviction hook."""
        self._lru.pop(ref.slot, None)
        self._pins.pop(ref.slot, None)
        self._on_evict(ref)
        return ref

    def pin(self, ref: AdapterRef) -> None:
        self._pins[ref.slot] = self._pins.get(ref.slot, 0) + 1

    def unpin(self, ref: AdapterRef) -> None:
        n = self._pins.get(ref.slot, 0) - 1
        if n > 0:
            self._pins[ref.slot] = n
        else:
            self._pins.pop(ref.slot, None)

    def pinned(self, ref: AdapterRef) -> bool:
        return self._pins.get(ref.slot, 0) > 0
