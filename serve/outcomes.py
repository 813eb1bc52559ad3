"""Outcomes of alias-routed requests, shipped to the controller (which writes them to the registry) in batches,
off the request path.

Each served (or shadowed) request of an alias leaves one outcome row (version, ok, latency, output confidence,
noise flag, shadow agreement); sampled requests of aliases with capture on also leave their prompt and output.
The rollout controller compares versions on these rows, and the refresh job trains on the captures that got
feedback. Like the monitor's feature shipper, a failing sink drops the batch and logs it; it never fails a
request, and the buffer is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


Capture = tuple[str, str, str, str, str, float]  # request_id, alias, version key, prompt, output, time
Sink = Callable[[list[dict[str, Any]], list[Capture]], Awaitable[Any]]


class OutcomeRecorder:
    """Buffers outcome rows and captures on a replica and hands them to ``sink`` every ``interval_s``.

    Args:
        sink: ``await sink(rows, captures)`` (the controller's ``record_outcomes``); None records nothing.
        interval_s: how often a non-empty buffer is written.
        max_buffer: rows kept while the registry is unavailable; beyond it the oldest are dropped.
    """

    def __init__(self, sink: Sink | None, *, interval_s: float = 0.5, max_buffer: int = 20_000) -> None:
        self.sink = sink
        self.interval_s = interval_s
        self._rows: deque[dict[str, Any]] = deque(maxlen=max_buffer)
        self._captures: deque[Capture] = deque(maxlen=max_buffer)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def add(self, row: dict[str, Any]) -> None:
        if self.sink is None:
            return
        row.setdefault("ts", time.time())
        self._rows.append(row)
        self._start()

    def capture(self, request_id: str, alias: str, version_key: str, prompt: str, output: str) -> None:
        if self.sink is None:
            return
        self._captures.append((request_id, alias, version_key, prompt, output, time.time()))
        self._start()

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Write everything buffered now (tests and shutdown call it directly)."""
        rows = [self._rows.popleft() for _ in range(len(self._rows))]
        caps = [self._captures.popleft() for _ in range(len(self._captures))]
        if (not rows and not caps) or self.sink is None:
            return
        try:
            await self.sink(rows, caps)
        except Exception as e:  # the controller being unavailable must never reach a request
            # keep them for the next flush (a restarting controller is back in seconds); the buffer stays bounded
            room = max(0, (self._rows.maxlen or 0) - len(self._rows))
            cap_room = max(0, (self._captures.maxlen or 0) - len(self._captures))
            # the newest that fit (a start index below 0 would wrap around)
            keep_rows, keep_caps = rows[max(0, len(rows) - room):], caps[max(0, len(caps) - cap_room):]
            self._rows.extendleft(reversed(keep_rows))
            self._captures.extendleft(reversed(keep_caps))
            self.dropped += len(rows) - len(keep_rows) + len(caps) - len(keep_caps)
            logger.warning(f"controller unavailable, {len(rows)} outcomes and {len(caps)} captures kept for a "
                           f"retry: {type(e).__name__}: {e}")
