"""The monitor: one owner of every adapter's drift state, fed asynchronously by all serving replicas.

Replicas ship :class:`Observation` batches off the request path (:class:`FeatureShipper`); the monitor updates
each adapter's :class:`~tsugiki.monitoring.drift.DriftDetector`, keeps a window of recent requests, writes an
event for every alarm, exports drift metrics and saves its state so a restart resumes where it stopped.

State on disk (``state_dir``), never pickled::

    <adapter>/state.json    scalars (CUSUM statistic, counts, config, alarm flag)
    <adapter>/arrays.npz    reference profile arrays (loaded with allow_pickle=False)
    events.jsonl            one alarm event per line
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from tsugiki.monitoring.drift import DriftConfig, DriftDetector
from tsugiki.monitoring.metrics import DriftMetrics, RequestQualityMetrics

logger = logging.getLogger(__name__)


@dataclass
class Observation:
    """What a replica reports about one served request."""

    adapter: str
    request_id: str
    time: float
    features: np.ndarray | None
    # the user text's noise score without over_length (NoiseReport.text_score), which the drift detector's noise
    # CUSUM ranks; None: not scored (no user text, or noise scoring off)
    noise_score: float | None = None
    noise_reasons: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_logprob: float | None = None
    prompt_logprob: float | None = None


class MonitorConfig(BaseModel):
    """Monitor settings: where state lives, defaults and per-adapter overrides of the drift settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state_dir: Path | None = Field(default=None, description="Default: $TSUGIKI_HOME/monitor.")
    drift: DriftConfig = DriftConfig()
    adapters: dict[str, DriftConfig] = Field(default_factory=dict)
    max_events: int = Field(default=1000, gt=0)
    save_interval_s: float = Field(default=5.0, ge=0)
    enabled: bool = Field(default=True, description="Noise scoring and feature shipping on the replicas.")
    noise_thresholds: dict[str, float] | None = Field(default=None, description="Default: shipped calibration.")


@dataclass
class _AdapterState:
    detector: DriftDetector
    alarm: bool = False
    # (request id, feature z, noise z or NaN, flagged noisy?, output log-probability)
    recent: deque[tuple[str, float, float, bool, float | None]] = field(default_factory=lambda: deque(maxlen=200))
    dirty: bool = False
    reference_source: str = "first requests"
    reference_key: str | None = None


class Monitor:
    """Per-adapter drift detection over shipped observations.

    Args:
        config: monitor settings.
        registry: Prometheus registry for the drift metrics.
    """

    def __init__(self, config: MonitorConfig | None = None, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config or MonitorConfig()
        from tsugiki.config import default_home

        self.state_dir = (self.config.state_dir or default_home() / "monitor").expanduser().resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry or CollectorRegistry()
        self.metrics = DriftMetrics(self.registry)
        self._adapters: dict[str, _AdapterState] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=self.config.max_events)
        self._last_save = time.monotonic()
        self.load()

    # ---- state ---------------------------------------------------------------------------------------------
    def _state(self, adapter: str) -> _AdapterState:
        st = self._adapters.get(adapter)
        if st is None:
            cfg = self.config.adapters.get(adapter, self.config.drift)
            st = self._adapters[adapter] = _AdapterState(DriftDetector(config=cfg))
            st.recent = deque(maxlen=cfg.window)
            self._export(adapter, st)
        return st

    def _export(self, adapter: str, st: _AdapterState) -> None:
        det = st.detector
        self.metrics.score.labels(adapter).set(det.statistic)
        self.metrics.threshold.labels(adapter).set(det.threshold)
        self.metrics.noise_score.labels(adapter).set(det.noise_statistic)
        # NaN (no threshold) while the noise CUSUM is off or collecting its reference: a gap in the panel
        hn = det.noise_threshold
        self.metrics.noise_threshold.labels(adapter).set(hn if math.isfinite(hn) else math.nan)
        self.metrics.alarm.labels(adapter).set(1.0 if st.alarm else 0.0)
        collected = sum(len(p) for p in det.pending)
        self.metrics.reference.labels(adapter).set(1.0 if det.ready else collected / det.config.reference_size)

    def set_reference(self, adapter: str, features: np.ndarray, source: str = "given features",
                      key: str | None = None, noise: np.ndarray | None = None) -> dict[str, Any]:
        """Use ``features`` (e.g. the monitor features of the adapter's tuning data, see
        :mod:`tsugiki.monitoring.reference`) and, when given, ``noise`` (their noise scores) as the adapter's
        reference; restarts its CUSUMs. Without ``noise`` the noise reference is collected from the next
        requests. With ``key`` (the
        adapter version it belongs to) a reference already set under that key is kept as it is: every replica
        may hand it over. A raised alarm stays raised until :meth:`reset`. ``ValueError`` when there are too few
        features."""
        st = self._state(adapter)
        if key is not None and key == st.reference_key and st.detector.ready:
            return self.status(adapter)
        st.detector.set_reference(np.asarray(features), None if noise is None else np.asarray(noise, dtype=float))
        st.dirty, st.reference_source, st.reference_key = True, source, key
        self._export(adapter, st)
        self._save_adapter(adapter, st)
        return self.status(adapter)

    def reset(self, adapter: str) -> dict[str, Any]:
        """Acknowledge an alarm: clear the flag and restart the CUSUM (the reference stays). A name the monitor has
        no state for has no alarm: nothing is created for it (no metric series, no state directory)."""
        st = self._adapters.get(adapter)
        if st is None:
            return self.status(adapter)
        st.alarm, st.detector.statistic, st.detector.noise_statistic, st.dirty = False, 0.0, 0.0, True
        self._export(adapter, st)
        self._save_adapter(adapter, st)
        return self.status(adapter)

    # ---- observations --------------------------------------------------------------------------------------
    def observe(self, batch: list[Observation | dict[str, Any]]) -> int:
        """Process shipped observations (any order across adapters, arrival order within one). Returns alarms."""
        by_adapter: dict[str, list[Observation]] = {}
        for o in batch:
            obs = o if isinstance(o, Observation) else Observation(**o)
            if obs.features is None:
                continue
            by_adapter.setdefault(obs.adapter, []).append(obs)
        fired_total = 0
        for adapter, rows in by_adapter.items():
            if not self.config.adapters.get(adapter, self.config.drift).enabled:
                continue
            st = self._state(adapter)
            noise = np.array([np.nan if r.noise_score is None else float(r.noise_score) for r in rows])
            res = st.detector.update(np.stack([np.asarray(r.features, dtype=np.float64) for r in rows]), noise)
            self.metrics.observations.labels(adapter).inc(len(rows))
            fired = dict(zip(res.alarms, res.channels))
            for i, r in enumerate(rows):
                if i >= res.offset:
                    st.recent.append((r.request_id, float(res.z[i - res.offset]), float(res.z_noise[i]),
                                      bool(r.noise_reasons), r.output_logprob))
                if i in fired:
                    fired_total += 1
                    st.alarm = True
                    self.metrics.alarms.labels(adapter).inc()
                    self._event(adapter, st, fired[i])
            st.dirty = True
            self._export(adapter, st)
        if self.config.save_interval_s == 0 or time.monotonic() - self._last_save >= self.config.save_interval_s:
            self.save()
        return fired_total

    def _event(self, adapter: str, st: _AdapterState, channel: str) -> None:
        det = st.detector
        recent = list(st.recent)
        zs = [r[1] for r in recent]
        zn = [r[2] for r in recent if not math.isnan(r[2])]
        lps = [r[4] for r in recent if r[4] is not None]
        # the requests that pushed the CUSUM that fired the most (NaN noise scores sort last)
        def push(r: tuple[str, float, float, bool, float | None]) -> float:
            z = r[1] if channel == "features" else r[2]
            return -z if not math.isnan(z) else math.inf

        top = sorted(recent, key=push)[:5]
        if channel == "noise":
            statistic, threshold = "cusum_noise_score_rank", det.noise_threshold
        else:
            statistic = ("cusum_novelty_plus_mean_shift" if det.config.mean_shift_rate > 0
                         else "cusum_standardised_knn_novelty")
            threshold = det.threshold
        ev = {
            "id": uuid.uuid4().hex, "type": "drift_alarm", "adapter": adapter, "time": time.time(),
            "statistic": statistic, "threshold": threshold,
            "requests_seen": det.seen, "ert": det.config.ert,
            "window": {"requests": len(recent), "mean_z": float(np.mean(zs)) if zs else None,
                       "share_above_reference_p95": float(np.mean(np.array(zs) > 1.645)) if zs else None,
                       "mean_noise_z": float(np.mean(zn)) if zn else None,
                       "noisy_share": float(np.mean([r[3] for r in recent])) if recent else None,
                       "mean_output_logprob": float(np.mean(lps)) if lps else None},
            "example_request_ids": [r[0] for r in top],
        }
        self._events.append(ev)
        with (self.state_dir / "events.jsonl").open("a") as f:
            f.write(json.dumps(ev) + "\n")
        logger.warning("drift alarm", extra={"adapter": adapter})
        self._save_adapter(adapter, st)

    # ---- queries -------------------------------------------------------------------------------------------
    def events(self, adapter: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        evs = [e for e in self._events if adapter is None or e["adapter"] == adapter]
        return evs[-limit:][::-1]

    def status(self, adapter: str) -> dict[str, Any]:
        st = self._adapters.get(adapter)
        if st is None:
            return {"adapter": adapter, "state": "no traffic yet"}
        det = st.detector
        zs = [r[1] for r in st.recent]
        return {"adapter": adapter, "state": "alarm" if st.alarm else ("monitoring" if det.ready else "collecting "
                                                                         "reference"),
                "alarm": st.alarm, "statistic": det.statistic, "threshold": det.threshold,
                "noise_statistic": det.noise_statistic,  # the threshold is infinite with the noise CUSUM off: JSON null
                "noise_threshold": det.noise_threshold if math.isfinite(det.noise_threshold) else None,
                "noise_reference": ("off" if det.config.noise_share <= 0 else "ready" if det.noise_ready
                                    else f"collecting ({sum(len(p) for p in det.noise_pending)} scored requests)"),
                "requests_seen": det.seen, "alarms": det.alarms,
                "reference_collected": det.config.reference_size if det.ready else sum(len(p) for p in det.pending),
                "reference_source": st.reference_source,
                "config": det.config.model_dump(),
                "window": {"requests": len(zs), "mean_z": float(np.mean(zs)) if zs else None},
                "events": self.events(adapter, limit=5)}

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def alarms(self) -> dict[str, bool]:
        """Whether each adapter's drift alarm is raised (until :meth:`reset`)."""
        return {a: st.alarm for a, st in self._adapters.items()}

    # ---- persistence ---------------------------------------------------------------------------------------
    def save(self) -> None:
        for adapter, st in self._adapters.items():
            if st.dirty:
                self._save_adapter(adapter, st)
        self._last_save = time.monotonic()

    def _save_adapter(self, adapter: str, st: _AdapterState) -> None:
        d = self.state_dir / adapter
        d.mkdir(parents=True, exist_ok=True)
        scalars, arrays = st.detector.state_dict()
        scalars["alarm"] = st.alarm
        scalars["reference_source"], scalars["reference_key"] = st.reference_source, st.reference_key
        _atomic_write(d / "arrays.npz", lambda f: np.savez(f, **arrays))
        _atomic_write(d / "state.json", lambda f: f.write(json.dumps(scalars).encode()))
        st.dirty = False

    def load(self) -> None:
        for d in sorted(p for p in self.state_dir.iterdir() if p.is_dir()):
            try:
                scalars = json.loads((d / "state.json").read_text())
                with np.load(d / "arrays.npz", allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                # the settings in force now, not those saved: an operator's change (or a new setting's default
                # after an upgrade, or saved settings this version no longer accepts) applies to adapters that
                # already have state; the saved profile keeps its own shapes
                det = DriftDetector.from_state(scalars, arrays,
                                               config=self.config.adapters.get(d.name, self.config.drift))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning(f"ignoring unreadable monitor state in {d}: {e}")
                continue
            st = _AdapterState(det, alarm=bool(scalars.get("alarm")),
                               reference_source=str(scalars.get("reference_source", "first requests")),
                               reference_key=scalars.get("reference_key"))
            st.recent = deque(maxlen=st.detector.config.window)
            self._adapters[d.name] = st
            self._export(d.name, st)
        events = self.state_dir / "events.jsonl"
        if events.is_file():
            for line in events.read_text().splitlines()[-self.config.max_events:]:
                try:
                    self._events.append(json.loads(line))
                except ValueError:
                    continue


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureShipper:
    """Buffers observations on a replica and ships them in batches, off the request path.

    ``sink`` is awaited with each batch (a monitor handle call under Ray, ``Monitor.observe`` in-process). A
    failing or absent sink drops the batch and counts it; it never fails a request. The buffer is bounded.

    Args:
        sink: async callable taking a list of observation dicts.
        metrics: where shipped/dropped counts go.
        batch_size: ship as soon as this many are buffered.
        interval_s: otherwise ship at least this often.
        max_buffer: observations kept while the monitor is slow; beyond it the oldest are dropped.
    """

    def __init__(self, sink: Callable[[list[dict[str, Any]]], Awaitable[Any]] | None,
                 metrics: RequestQualityMetrics | None = None, *, batch_size: int = 64, interval_s: float = 0.5,
                 max_buffer: int = 10_000) -> None:
        self.sink = sink
        self.metrics = metrics
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._buf: deque[dict[str, Any]] = deque()
        self._max = max_buffer
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, obs: Observation) -> None:
        if self.sink is None:
            return
        if len(self._buf) >= self._max:
            self._buf.popleft()
            if self.metrics:
                self.metrics.dropped.inc()
        self._buf.append(asdict(obs))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._buf) >= self.batch_size:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._buf and self.sink is not None:
            batch = [self._buf.popleft() for _ in range(min(self.batch_size * 4, len(self._buf)))]
            try:
                await self.sink(batch)
            except Exception as e:  # the monitor being down must never reach a request
                logger.warning(f"monitor unreachable, dropped {len(batch)} observations: {type(e).__name__}")
                if self.metrics:
                    self.metrics.dropped.inc(len(batch))
                return
            if self.metrics:
                self.metrics.shipped.inc(len(batch))

