"""The control plane: the one process that owns the registry, drives rollouts and runs refreshes.

:class:`ControlPlane` is plain asyncio Python (the ``Controller`` Ray Serve deployment is a thin shell over it, and
tests run it in-process). It serves:

* model replicas: the alias snapshot they route with, and the sink for their per-request outcomes and captures;
* the gateway: feedback, aliases, version registration, rollout operations, refresh requests, Alertmanager
  webhooks and the registry's event log;
* itself, every ``controller.tick_s``: one rollout decision per running rollout
  (:class:`~tsugiki.adapters.controller.RolloutController`), the monitor's new drift alarms turned into refresh
  requests, at most one refresh running at a time (:class:`~tsugiki.tuning.refresh.Refresher`, in a worker
  thread; tuning itself runs as a Ray task), and a rollout started for each candidate a refresh produced.

Everything it decides is in the registry, so a restarted control plane picks up where the last one stopped: running
rollouts continue from their recorded stage, a refresh that was running reruns into its checkpoint, a candidate
whose rollout never started gets one, and the drift-alarm cursor is a registry value.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from tsugiki.adapters.controller import RolloutController, RolloutMetrics
from tsugiki.adapters.format import read_lora_artifact
from tsugiki.adapters.registry import Registry, VersionState, parse_key
from tsugiki.adapters.routing import snapshot
from tsugiki.adapters.store import inside_roots
from tsugiki.config import Settings
from tsugiki.errors import InvalidRequestError, NotFoundError, TsugikiError
from tsugiki.tuning.config import TuneConfig
from tsugiki.tuning.refresh import Refresher, RefreshMetrics

logger = logging.getLogger(__name__)

DRIFT_CURSOR = "controller.drift_cursor"


class ControlPlane:
    """Registry owner, rollout driver and refresh runner.

    Args:
        settings: application settings (``registry`` and ``controller`` sections).
        monitor_events: ``await monitor_events()`` -> the monitor's recent events, newest first (None: no monitor).
        monitor_alarms: ``await monitor_alarms()`` -> ``{label: alarm raised}``.
        monitor_reset: ``await monitor_reset(label)``: acknowledge a label's alarm.
        tune_runner: how refreshes run the tuning job (default: a Ray task).
        base_fingerprint: the served base model's fingerprint, recorded on registered versions.
    """

    def __init__(self, settings: Settings, *, registry: Registry | None = None,
                 monitor_events: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
                 monitor_alarms: Callable[[], Awaitable[dict[str, bool]]] | None = None,
                 monitor_reset: Callable[[str], Awaitable[Any]] | None = None,
                 tune_runner: Callable[..., dict[str, Any]] | None = None, base_fingerprint: str = "",
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.cfg = settings.controller
        self.registry = registry or settings.open_registry()
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self._alarms: dict[str, bool] = {}
        self.rollouts = RolloutController(self.registry, self.cfg.rollout, drift=self._alarms.get,
                                          metrics=RolloutMetrics(self.metrics_registry))
        if not base_fingerprint:
            from tsugiki.serve.base_model import fingerprint, resolve_base_model

            base_fingerprint = fingerprint(resolve_base_model(settings.model))
        self.refresher = Refresher(self.registry, self.cfg.refresh, tune_runner=tune_runner,
                                   base_fingerprint=base_fingerprint, metrics=RefreshMetrics(self.metrics_registry))
        self.monitor_events = monitor_events
        self.monitor_alarms = monitor_alarms
        self.monitor_reset = monitor_reset
        self.roots = settings.adapter_roots()
        self._refresh_task: asyncio.Task[Any] | None = None
        self._stale: set[str] = set()  # refresh candidates left for an operator (gated against a stable since replaced)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.last_tick: list[dict[str, Any]] = []

    # ---- the loop ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`step` every ``tick_s`` in the current event loop."""
        if self._loop_task is None:
            self._stopping.clear()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """End the loop now, mid-step if need be: every registry write is one transaction, and a rollout decision
        recorded but not carried out is completed by the next controller (a step can be waiting on a monitor that
        is shutting down too, so waiting for it would only delay shutdown). A running refresh is cancelled; a
        restarted controller resumes it from its checkpoint."""
        self._stopping.set()
        for t in (self._loop_task, self._refresh_task):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        self._loop_task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.step()
            except RuntimeError as e:
                if "after shutdown" in str(e):  # the process is exiting (the thread pool is gone): stop quietly
                    logger.info("control loop stopped: the process is shutting down")
                    return
                logger.exception("control step failed")
            except Exception:  # the loop must outlive any one failure; the next tick retries
                logger.exception("control step failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.cfg.tick_s)
            except asyncio.TimeoutError:
                pass

    async def step(self) -> list[dict[str, Any]]:
        """One round: drift alarms -> refresh requests, rollout decisions, refreshes, rollouts of new candidates."""
        if self.monitor_alarms is not None:
            try:
                self._alarms.clear()
                self._alarms.update(await self.monitor_alarms())
            except Exception as e:
                logger.warning(f"monitor unreachable for alarm states: {type(e).__name__}")
        await self._poll_drift_events()
        self.last_tick = await asyncio.to_thread(self.rollouts.tick)
        await self._clear_alarms_of_finished_versions()
        self._run_refreshes()
        await asyncio.to_thread(self._roll_out_new_candidates)
        return self.last_tick

    async def _poll_drift_events(self) -> None:
        if self.monitor_events is None or not self.cfg.refresh.enabled:
            return
        try:
            events = await self.monitor_events()
        except Exception as e:
            logger.warning(f"monitor unreachable for drift events: {type(e).__name__}")
            return
        cursor = float(await asyncio.to_thread(self.registry.get_value, DRIFT_CURSOR, 0.0))
        new = sorted((e for e in events if e.get("type") == "drift_alarm" and float(e["time"]) > cursor),
                     key=lambda e: float(e["time"]))
        for ev in new:
            alias = await asyncio.to_thread(self.alias_of, str(ev["adapter"]))
            if alias is not None:
                res = await asyncio.to_thread(self.refresher.request, alias, source="monitor",
                                              reason=f"drift alarm on {ev['adapter']} (event {ev['id']})")
                logger.info("drift alarm", extra={"alias": alias, **{k: v for k, v in res.items() if k != "alias"}})
        if new:
            await asyncio.to_thread(self.registry.set_value, DRIFT_CURSOR, float(new[-1]["time"]))

    async def _clear_alarms_of_finished_versions(self) -> None:
        """A retired or rolled-back version serves nobody: its drift alarm is acknowledged (else the alert on it
        would keep firing, and keep asking for refreshes, forever)."""
        if self.monitor_reset is None:
            return
        for label in [k for k, on in self._alarms.items() if on and "@v" in k]:
            try:
                rec = await asyncio.to_thread(self.registry.get, *parse_key(label))
            except TsugikiError:
                continue  # not a registry version
            if rec.state in (VersionState.retired, VersionState.rolled_back):
                try:
                    await self.monitor_reset(label)
                    self._alarms[label] = False
                    logger.info("drift alarm acknowledged", extra={"adapter": label, "state": rec.state.value})
                except Exception as e:
                    logger.warning(f"monitor unreachable to acknowledge {label}: {type(e).__name__}")

    def alias_of(self, label: str) -> str | None:
        """The alias a monitor label belongs to: the alias itself, or the alias whose stable route it is."""
        aliases = self.registry.aliases()
        for a in aliases:
            if a.alias == label:
                return a.alias
        for a in aliases:
            if a.routes.get(label, 0.0) >= 1.0 - 1e-9:
                return a.alias
        return None

    def _run_refreshes(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        pending = self.refresher.pending()
        if not pending:
            return
        ref = pending[0]
        logger.info("refresh starting", extra={"alias": ref.alias, "refresh": ref.id, "state": ref.state})
        self._refresh_task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.refresher.run, ref))

    def _roll_out_new_candidates(self) -> None:
        """Start a rollout for every candidate a finished refresh registered and nobody rolled out yet, if the alias
        still serves the stable version it was trained from and gated against. One whose stable was replaced
        meanwhile (an operator's rollout finished while it trained) is left a candidate: its gate never compared
        it with the version it would replace, so an operator decides (``tsugiki rollout start``)."""
        for ref in self.registry.refreshes():
            if ref.state != "done" or ref.candidate is None or ref.candidate in self._stale:
                continue
            rec = self.registry.get(*parse_key(ref.candidate))
            if rec.state != VersionState.candidate or self.registry.get_rollout(ref.alias) is not None:
                continue
            gated_against = ref.detail.get("stable") or (f"{rec.name}@v{rec.parent_version}"
                                                        if rec.parent_version is not None else None)
            try:
                routes = self.registry.get_alias(ref.alias).routes
            except NotFoundError:  # deleted while the refresh trained: nothing to roll out over
                self._stale.add(ref.candidate)
                logger.warning("refresh candidate not rolled out: its alias was deleted",
                               extra={"alias": ref.alias, "candidate": ref.candidate})
                continue
            stable = [k for k, w in routes.items() if w >= 1.0 - 1e-9]
            if not stable:
                continue  # an operator's split, without a rollout: decide once it has one stable version again
            if gated_against is not None and stable != [gated_against]:
                self._stale.add(ref.candidate)
                logger.warning("refresh candidate not rolled out: the alias's stable version changed while it "
                               "trained", extra={"alias": ref.alias, "candidate": ref.candidate,
                                                "gated_against": gated_against, "stable": stable})
                continue
            res = self.rollouts.start(ref.alias, ref.candidate, actor="refresh")
            logger.info("rollout started", extra=res)

    async def wait_refreshes(self) -> None:
        """Wait for the running refresh, if any (tests and the demo)."""
        if self._refresh_task is not None:
            await asyncio.shield(self._refresh_task)

    # ---- for model replicas ----------------------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        return await asyncio.to_thread(snapshot, self.registry)

    async def record_outcomes(self, rows: list[dict[str, Any]], captures: list[Any]) -> int:
        def write() -> int:
            n = self.registry.record_outcomes(rows) if rows else 0
            for request_id, alias, key, prompt, output, ts in captures:
                self.registry.capture(request_id, alias, key, prompt, output, ts=ts)
            return n

        return await asyncio.to_thread(write)

    # ---- for the gateway ---------------------------------------------------------------------------------------
    async def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        def add() -> dict[str, Any]:
            rid = str(body["request_id"])
            served = self.registry.outcome_of(rid) or {}
            fid = self.registry.add_feedback(rid, label=body.get("label"), preferred=body.get("preferred"),
                                             score=body.get("score"), user=body.get("user"),
                                             alias=served.get("alias"), version_key=served.get("version_key"))
            return {"id": fid, "request_id": rid, **served}

        return await asyncio.to_thread(add)

    async def feedback_list(self, alias: str | None = None, limit: int = 100) -> dict[str, Any]:
        """How much feedback is stored (for ``alias``), and the newest ``limit`` entries."""
        count = await asyncio.to_thread(self.registry.feedback_count, alias=alias)
        rows = await asyncio.to_thread(self.registry.feedback, alias=alias, limit=limit, newest=True)
        return {"count": count, "data": [{"id": f.id, "ts": f.ts, "request_id": f.request_id, "alias": f.alias,
                                          "version_key": f.version_key, "label": f.label, "score": f.score}
                                         for f in rows]}

    async def register(self, name: str, path: str, *, data_path: str | None = None,
                       tune: dict[str, Any] | None = None, actor: str = "operator") -> dict[str, Any]:
        """Register the adapter directory ``path`` (inside the allowed adapter roots) as a candidate of ``name``.

        The artifact must read as a servable LoRA adapter (the structural checks a replica makes; whether it fits
        the base model is checked where the model is), and one whose model card says its gate failed is refused:
        the tuning job keeps such candidates aside on purpose."""
        real = inside_roots(path, self.roots)
        await asyncio.to_thread(read_lora_artifact, real, max_file_bytes=self.settings.adapters.max_file_bytes)
        gate = _card(real).get("gate") or {}
        if isinstance(gate, dict) and gate.get("passed") is False:
            raise InvalidRequestError(f"adapter at {str(path)!r} failed its regression gate "
                                      f"({'; '.join(map(str, gate.get('failures') or [])) or 'see its model card'}); "
                                      "retune it, or loosen the gate and rerun the job, rather than register it",
                                      param="path", code="gate_failed")
        try:
            TuneConfig(**(tune or {}))  # refreshes start from it: a typo must fail here, not in a refresh
        except ValidationError as e:
            raise InvalidRequestError(f"tune: not valid TuneConfig fields: {e.errors()[0]['loc']}: "
                                      f"{e.errors()[0]['msg']}", param="tune") from e
        cfg: dict[str, Any] = {"tune": tune or {}}
        if data_path is not None:
            cfg["data_path"] = str(inside_roots(data_path, self.roots, param="data_path", what="data_path"))
        rec = await asyncio.to_thread(self.registry.register, name, real, base_fingerprint=self._fingerprint(real),
                                      tuning_config=cfg, gate_report=_card(real).get("gate", {}), actor=actor)
        return _version_json(rec)

    def _fingerprint(self, path: Path) -> str:
        base = self.refresher.base_fingerprint
        card = _card(path).get("base_model_fingerprint")
        if card and card != base:
            raise InvalidRequestError(f"adapter at {str(path)!r} was tuned on base model {card}, but this gateway "
                                      f"serves {base}; retune it on the served base model", param="path",
                                      code="base_model_mismatch")
        return base

    async def versions(self, name: str | None = None) -> list[dict[str, Any]]:
        return [_version_json(v) for v in await asyncio.to_thread(self.registry.versions, name)]

    async def aliases(self) -> list[dict[str, Any]]:
        out = []
        for a in await asyncio.to_thread(self.registry.aliases):
            ro = await asyncio.to_thread(self.registry.get_rollout, a.alias)
            out.append({"alias": a.alias, "routes": a.routes, "shadow": a.shadow, "shadow_share": a.shadow_share,
                        "capture_rate": a.capture_rate, "capture_retention": a.capture_retention,
                        "generation": a.generation, "updated": a.updated,
                        "rollout": None if ro is None else {"id": ro.id, "candidate": ro.candidate,
                                                            "stage": ro.stage, "state": ro.state.value}})
        return out

    async def set_capture(self, alias: str, rate: float, retention: int) -> dict[str, Any]:
        a = await asyncio.to_thread(self.registry.set_capture, alias, rate, retention, actor="operator")
        return {"alias": a.alias, "capture_rate": a.capture_rate, "capture_retention": a.capture_retention}

    async def rollout(self, op: str, alias: str, **kw: Any) -> dict[str, Any]:
        """``start`` (``candidate=``), ``promote``, ``pause``, ``resume``, ``rollback`` or ``status``."""
        fns: dict[str, Callable[..., dict[str, Any]]] = {
            "start": self.rollouts.start, "promote": self.rollouts.promote, "pause": self.rollouts.pause,
            "resume": self.rollouts.resume, "rollback": self.rollouts.rollback, "status": self.rollouts.status}
        if op not in fns:
            raise NotFoundError(f"no rollout operation {op!r}; use one of {sorted(fns)}", param="op")
        if op == "start" and "candidate" not in kw:
            raise InvalidRequestError("starting a rollout needs the candidate version key (name@vN)",
                                      param="candidate")
        return await asyncio.to_thread(fns[op], alias, **kw)

    async def request_refresh(self, alias: str, *, reason: str, source: str, force: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self.refresher.request, alias, reason=reason, source=source, force=force)

    async def refreshes(self, alias: str | None = None) -> list[dict[str, Any]]:
        return [{"id": r.id, "alias": r.alias, "state": r.state, "reason": r.reason, "source": r.source,
                 "candidate": r.candidate, "detail": r.detail, "started": r.started, "updated": r.updated}
                for r in await asyncio.to_thread(self.registry.refreshes, alias)]

    async def alertmanager(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An Alertmanager webhook (version 4 payload): firing alerts named in ``controller.refresh_alerts`` that
        name an alias (label ``alias``) or a served version (label ``adapter``) request a refresh of that alias;
        every alert is logged in the registry's event log."""
        alerts = payload.get("alerts")
        if not isinstance(alerts, list):
            raise InvalidRequestError("an Alertmanager webhook payload has an 'alerts' list", param="alerts")
        out = []
        if not all(isinstance(a, dict) for a in alerts):
            raise InvalidRequestError("each alert in an Alertmanager webhook payload is an object", param="alerts")
        for a in alerts:
            labels = a.get("labels") or {}
            if not isinstance(labels, dict):
                raise InvalidRequestError("an alert's 'labels' is an object of label names to values", param="alerts")
            name, status = str(labels.get("alertname", "")), str(a.get("status", payload.get("status", "")))
            target = labels.get("alias") or labels.get("adapter")
            alias = await asyncio.to_thread(self.alias_of, str(target)) if target else None
            await asyncio.to_thread(self.registry.log_event, "alert", alias=alias, actor="alertmanager",
                                    payload={"alertname": name, "status": status, "labels": labels})
            if status == "firing" and name in self.cfg.refresh_alerts and alias is not None:
                res = await self.request_refresh(alias, reason=f"Alertmanager: {name} firing", source="alertmanager")
                out.append({"alert": name, "alias": alias, **res})
            else:
                why = ("resolved" if status != "firing" else "not a refresh alert" if name not in
                       self.cfg.refresh_alerts else f"no alias for {target!r}")
                out.append({"alert": name, "alias": alias, "accepted": False, "why": why})
        return {"received": len(alerts), "results": out}

    async def events(self, alias: str | None = None, since_id: int | None = None,
                     limit: int = 100) -> list[dict[str, Any]]:
        evs = await asyncio.to_thread(self.registry.events, alias=alias, since_id=since_id, limit=limit)
        return [{"id": e.id, "ts": e.ts, "kind": e.kind, "alias": e.alias, "name": e.name, "version": e.version,
                 "actor": e.actor, "payload": e.payload} for e in evs]


def _card(path: Path) -> dict[str, Any]:
    f = path / "model_card.json"
    try:
        card = json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        return {}
    return card if isinstance(card, dict) else {}


def _version_json(v: Any) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "key": v.key, "digest": v.digest, "state": v.state.value,
            "parent_version": v.parent_version, "data_hash": v.data_hash, "base_fingerprint": v.base_fingerprint,
            "gate_report": v.gate_report, "created": v.created, "updated": v.updated, "artifact_uri": v.artifact_uri}

