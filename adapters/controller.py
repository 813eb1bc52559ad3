"""The rollout controller: moves a candidate version of an alias through shadow, canary steps and stable.

Every rollout's progress lives in the registry (its ``rollouts`` row, the alias's routes, the versions' states),
and the evidence is the registry's per-request ``outcomes``; the controller holds no state of its own. One
:meth:`RolloutController.tick` looks at every running rollout: it re-applies the stage's routes and version states
(so a controller killed between two writes repairs the half-applied step when it comes back), gathers the stage's
evidence for candidate and baseline, asks the pure policy (:func:`tsugiki.adapters.rollout.decide`) and applies the
answer. Every decision other than "wait" is an event with the numbers behind it, and a metric.

Registry stage numbers: 0 is the shadow stage, ``i + 1`` is canary step ``i`` of the plan (the policy numbers the
shadow stage -1). A plan without shadow traffic starts at stage 1.

Finishing a rollout takes several registry writes (routes, two version states, the rollout row). The intent is
written first (``evidence.finishing``), so a restart completes a promotion or rollback instead of re-opening it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from tsugiki.adapters.registry import Registry, Rollout, RolloutState, VersionState, parse_key
from tsugiki.adapters.rollout import Decision, RolloutPlan, VersionEvidence, decide, weights_for
from tsugiki.errors import ConflictError, InvalidRequestError, NotFoundError

logger = logging.getLogger(__name__)

# How often an unchanged "wait" is written to the event log (every decision is still a metric).
WAIT_EVENT_EVERY_S = 60.0


class RolloutMetrics:
    """Rollout metrics (labels bounded by the registry's aliases and versions)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.weight = Gauge("tsugiki_rollout_weight", "Traffic weight of a version on an alias.",
                            ["alias", "version"], **kw)
        self.shadow_share = Gauge("tsugiki_rollout_shadow_share", "Share of an alias's traffic copied to its shadow.",
                                  ["alias"], **kw)
        self.stage = Gauge("tsugiki_rollout_stage", "Stage of the alias's active rollout (0 shadow, i+1 canary step "
                           "i), -1 when none is active.", ["alias"], **kw)
        self.decisions = Counter("tsugiki_rollout_decisions", "Rollout decisions by action.",
                                 ["alias", "action"], **kw)
        self.finished = Counter("tsugiki_rollouts_finished", "Finished rollouts by outcome (promoted, rolled_back).",
                                ["alias", "outcome"], **kw)


class RolloutController:
    """Drives the registry's rollouts.

    Args:
        registry: the shared registry.
        plan: the default plan for new rollouts (a rollout keeps the plan it started with).
        drift: ``drift(version_key) -> bool``, whether the monitor's drift alarm is raised for that version.
        metrics: where rollout metrics go.
        clock: wall-clock time (stage durations survive restarts, so not a monotonic clock).
    """

    def __init__(self, registry: Registry, plan: RolloutPlan | None = None, *,
                 drift: Callable[[str], bool] | None = None, metrics: RolloutMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.plan = plan or RolloutPlan()
        self.drift = drift
        self.metrics = metrics or RolloutMetrics(CollectorRegistry())
        self.clock = clock
        self._last_wait: dict[int, tuple[str, float]] = {}
        # One decision at a time: a tick and an operator's promote/rollback must not interleave their writes.
        self._lock = threading.RLock()

    # ---- starting ------------------------------------------------------------------------------------------------
    def start(self, alias: str, candidate: str, *, plan: RolloutPlan | None = None,
              actor: str = "system") -> dict[str, Any]:
        with self._lock:
            return self._start(alias, candidate, plan=plan, actor=actor)

    def _start(self, alias: str, candidate: str, *, plan: RolloutPlan | None = None,
               actor: str = "system") -> dict[str, Any]:
        """Start rolling ``candidate`` (a version key) out on ``alias``.

        The baseline is the version the alias fully routes to now. An alias that does not exist yet is created
        with the candidate as its stable version: there is nothing to compare a first version with.
        """
        plan = plan or self.plan
        name, version = parse_key(candidate)
        rec = self.registry.get(name, version)
        if rec.state != VersionState.candidate:
            raise ConflictError(f"{candidate} is {rec.state.value}; only a candidate can be rolled out",
                                param="candidate")
        existing = {a.alias: a for a in self.registry.aliases()}.get(alias)
        if existing is None:
            self.registry.set_alias(alias, {candidate: 1.0}, actor=actor, reason="first version of a new alias")
            self.registry.transition(name, version, VersionState.stable, actor=actor,
                                     reason=f"first version of alias {alias}")
            self._gauge_routes(alias, {candidate: 1.0}, 0.0, None)
            return {"alias": alias, "candidate": candidate, "state": "stable", "rollout": None}
        full = [k for k, w in existing.routes.items() if w >= 1.0 - 1e-9]
        if len(full) != 1:
            raise ConflictError(f"alias {alias!r} splits its traffic {existing.routes}; finish that split before "
                                "starting a rollout", param="alias")
        baseline = full[0]
        if baseline == candidate:
            raise InvalidRequestError(f"{candidate} already serves alias {alias!r}", param="candidate")
        for outcome in ("promoted", "rolled_back"):  # at 0 from the start: the first rollback is an increase
            self.metrics.finished.labels(alias, outcome)
        # the first stage is written with the row: a crash right after it leaves a consistent rollout
        ro = self.registry.start_rollout(alias, candidate, baseline, plan=plan.model_dump(mode="json"),
                                         stage=0 if plan.shadow_share > 0 else 1,
                                         evidence={"stage_started": self.clock()}, actor=actor)
        self._ensure(ro, actor=actor)
        return {"alias": alias, "candidate": candidate, "baseline": baseline, "state": "running", "rollout": ro.id,
                "stage": ro.stage}

    # ---- the loop ------------------------------------------------------------------------------------------------
    def tick(self) -> list[dict[str, Any]]:
        """Decide on every running rollout once; returns what was decided (waits included)."""
        with self._lock:
            return self._tick()

    def _tick(self) -> list[dict[str, Any]]:
        out = []
        for alias in self.registry.aliases():
            ro = self.registry.get_rollout(alias.alias)
            if ro is None:
                self.metrics.stage.labels(alias.alias).set(-1)
                continue
            try:
                out.append(self._tick_one(ro))
            except Exception as e:  # one broken rollout must not stop the others
                logger.exception("rollout tick failed", extra={"alias": ro.alias, "rollout": ro.id})
                out.append({"alias": ro.alias, "rollout": ro.id, "action": "error", "reason": str(e)})
        return out

    def _tick_one(self, ro: Rollout) -> dict[str, Any]:
        if ro.evidence.get("finishing"):
            return self._finish(ro, str(ro.evidence["finishing"]), actor="controller",
                                reason=str(ro.evidence.get("finishing_reason", "resumed after a restart")))
        self._ensure(ro, actor="controller")
        if ro.state == RolloutState.paused:
            return {"alias": ro.alias, "rollout": ro.id, "action": "paused", "reason": "paused by an operator"}
        plan = RolloutPlan(**ro.plan)
        started = float(ro.evidence.get("stage_started", ro.updated))
        cand, base = self.evidence(ro, started)
        d = decide(plan, ro.stage - 1, self.clock() - started, cand, base)
        self.metrics.decisions.labels(ro.alias, d.action).inc()
        summary = {"alias": ro.alias, "rollout": ro.id, "stage": ro.stage, "action": d.action, "reason": d.reason,
                   "candidate": ro.candidate, "baseline": ro.baseline}
        if d.action == "wait":
            self._log_wait(ro, d)
            return summary
        self.registry.log_event("rollout_decision", alias=ro.alias, actor="controller",
                                payload={"rollout_id": ro.id, "stage": ro.stage, **d.to_json()})
        logger.info("rollout decision", extra=summary)
        if d.action == "advance":
            now = self.clock()
            ev: dict[str, Any] = {"stage_started": now, "last": d.to_json()}
            if RolloutPlan(**ro.plan).steps[ro.stage] >= 1.0 and base is not None:
                # The candidate now serves everything: the baseline's evidence is what it did in the last split,
                # kept in the rollout row (outcome rows are pruned; the row stays).
                ev["baseline_evidence"] = dataclasses.asdict(base)
            ro = self.registry.update_rollout(ro.id, stage=ro.stage + 1, actor="controller", evidence=ev)
            self._ensure(ro, actor="controller")
            summary["stage"] = ro.stage
            return summary
        return {**summary, **self._finish(ro, "promote" if d.action == "promote" else "rollback",
                                          actor="controller", reason=d.reason, decision=d)}

    def evidence(self, ro: Rollout, since: float) -> tuple[VersionEvidence, VersionEvidence | None]:
        """The current stage's evidence: the candidate's shadowed (stage 0) or served outcomes, the baseline's
        served ones, since ``since``, with the monitor's drift alarm for each when known."""
        cand_rows = self.registry.outcomes(ro.candidate, since=since, shadow=ro.stage == 0)
        cand = VersionEvidence.from_records(cand_rows, drift_alarm=self._drift(ro.candidate))
        if ro.baseline is None:
            return cand, None
        kept = ro.evidence.get("baseline_evidence")
        if kept is not None:
            return cand, VersionEvidence(**{**kept, "drift_alarm": self._drift(ro.baseline)})
        base_rows = self.registry.outcomes(ro.baseline, since=since, shadow=False)
        return cand, VersionEvidence.from_records(base_rows, drift_alarm=self._drift(ro.baseline))

    def _drift(self, key: str) -> bool:
        if self.drift is None:
            return False
        try:
            return bool(self.drift(key))
        except Exception:  # no monitor, no drift evidence: the other checks still run
            return False

    def _log_wait(self, ro: Rollout, d: Decision) -> None:
        last = self._last_wait.get(ro.id)
        now = self.clock()
        kind = d.reason.split(":")[0]
        if last is None or last[0] != kind or now - last[1] >= WAIT_EVENT_EVERY_S:
            self._last_wait[ro.id] = (kind, now)
            self.registry.log_event("rollout_decision", alias=ro.alias, actor="controller",
                                    payload={"rollout_id": ro.id, "stage": ro.stage, **d.to_json()})

    # ---- applying --------------------------------------------------------------------------------------------
    def _ensure(self, ro: Rollout, *, actor: str) -> None:
        """Make routes and version states match the rollout's stage (idempotent)."""
        plan = RolloutPlan(**ro.plan)
        routes, shadow_share = weights_for(ro.stage - 1, plan, ro.candidate, ro.baseline)
        shadow = ro.candidate if shadow_share > 0 else None
        want = VersionState.shadow if ro.stage == 0 else VersionState.canary
        self._set_state(ro.candidate, want, actor=actor, reason=f"rollout {ro.id} stage {ro.stage}")
        alias = self.registry.get_alias(ro.alias)
        if alias.routes != routes or alias.shadow != shadow or abs(alias.shadow_share - shadow_share) > 1e-12:
            self.registry.set_alias(ro.alias, routes, shadow=shadow, shadow_share=shadow_share, actor=actor,
                                    reason=f"rollout {ro.id} stage {ro.stage}")
        self.metrics.stage.labels(ro.alias).set(ro.stage)
        self._gauge_routes(ro.alias, routes, shadow_share, ro)

    def _gauge_routes(self, alias: str, routes: dict[str, float], shadow_share: float, ro: Rollout | None) -> None:
        keys = set(routes) | ({ro.candidate, ro.baseline} - {None} if ro is not None else set())
        for k in keys:
            self.metrics.weight.labels(alias, str(k)).set(routes.get(str(k), 0.0))
        self.metrics.shadow_share.labels(alias).set(shadow_share)

    def _set_state(self, key: str, state: VersionState, *, actor: str, reason: str) -> None:
        name, version = parse_key(key)
        if self.registry.get(name, version).state != state:
            self.registry.transition(name, version, state, actor=actor, reason=reason)

    def _finish(self, ro: Rollout, how: str, *, actor: str, reason: str,
                decision: Decision | None = None) -> dict[str, Any]:
        """Promote (candidate takes all traffic and becomes stable, the baseline retires) or roll back (the
        baseline takes all traffic, the candidate is rolled back). Intent first, so a restart completes it; an
        intent already recorded wins over a later request (the first decision is the one carried out)."""
        if ro.evidence.get("finishing"):
            how = str(ro.evidence["finishing"])
        else:
            ro = self.registry.update_rollout(ro.id, actor=actor, evidence={
                **ro.evidence, "finishing": how, "finishing_reason": reason,
                "decision": decision.to_json() if decision is not None else None})
        if how == "promote":
            self.registry.set_alias(ro.alias, {ro.candidate: 1.0}, actor=actor, reason=f"promoted: {reason}")
            self._set_state(ro.candidate, VersionState.stable, actor=actor, reason=reason)
            if ro.baseline is not None:
                self._set_state(ro.baseline, VersionState.retired, actor=actor, reason=f"replaced by {ro.candidate}")
            routes = {ro.candidate: 1.0}
            final = RolloutState.promoted
        else:
            if ro.baseline is None:
                raise ConflictError(f"rollout {ro.id} on {ro.alias!r} has no baseline to roll back to",
                                    param="alias")
            self.registry.set_alias(ro.alias, {ro.baseline: 1.0}, actor=actor, reason=f"rolled back: {reason}")
            self._set_state(ro.candidate, VersionState.rolled_back, actor=actor, reason=reason)
            routes = {ro.baseline: 1.0}
            final = RolloutState.rolled_back
        self.registry.update_rollout(ro.id, state=final, actor=actor)
        self.metrics.finished.labels(ro.alias, final.value).inc()
        self.metrics.stage.labels(ro.alias).set(-1)
        self._gauge_routes(ro.alias, routes, 0.0, ro)
        logger.info("rollout finished", extra={"alias": ro.alias, "rollout": ro.id, "outcome": final.value})
        return {"alias": ro.alias, "rollout": ro.id, "action": "promote" if how == "promote" else "rollback",
                "state": final.value, "reason": reason}

    # ---- operators ---------------------------------------------------------------------------------------------
    def _active(self, alias: str) -> Rollout:
        ro = self.registry.get_rollout(alias)
        if ro is None:
            raise NotFoundError(f"alias {alias!r} has no active rollout", param="alias", code="rollout_not_found")
        return ro

    def promote(self, alias: str, *, actor: str = "operator", reason: str = "manual promotion") -> dict[str, Any]:
        with self._lock:
            self.metrics.decisions.labels(alias, "promote").inc()
            return self._finish(self._active(alias), "promote", actor=actor, reason=reason)

    def rollback(self, alias: str, *, actor: str = "operator", reason: str = "manual rollback") -> dict[str, Any]:
        with self._lock:
            self.metrics.decisions.labels(alias, "rollback").inc()
            return self._finish(self._active(alias), "rollback", actor=actor, reason=reason)

    def pause(self, alias: str, *, actor: str = "operator") -> dict[str, Any]:
        with self._lock:
            ro = self.registry.update_rollout(self._active(alias).id, state=RolloutState.paused, actor=actor)
            return {"alias": alias, "rollout": ro.id, "state": ro.state.value, "stage": ro.stage}

    def resume(self, alias: str, *, actor: str = "operator") -> dict[str, Any]:
        with self._lock:
            ro = self._active(alias)
            # the evidence clock restarts: what happened while paused was not watched for this stage's decision
            ro = self.registry.update_rollout(ro.id, state=RolloutState.running, actor=actor,
                                              evidence={**ro.evidence, "stage_started": self.clock()})
            return {"alias": alias, "rollout": ro.id, "state": ro.state.value, "stage": ro.stage}

    def status(self, alias: str) -> dict[str, Any]:
        """The alias's routes, its active (or last) rollout, and that rollout's current evidence."""
        a = self.registry.get_alias(alias)
        ro = self.registry.get_rollout(alias, active_only=False)
        out: dict[str, Any] = {"alias": alias, "routes": a.routes, "shadow": a.shadow, "shadow_share": a.shadow_share,
                               "rollout": None}
        if ro is not None:
            out["rollout"] = {"id": ro.id, "candidate": ro.candidate, "baseline": ro.baseline, "stage": ro.stage,
                              "state": ro.state.value, "plan": ro.plan, "started": ro.started,
                              "last_decision": ro.evidence.get("decision") or ro.evidence.get("last")}
            if ro.active:
                cand, base = self.evidence(ro, float(ro.evidence.get("stage_started", ro.updated)))
                out["rollout"]["evidence"] = {"candidate": _summary(cand),
                                              "baseline": _summary(base) if base is not None else None}
        return out


def _summary(ev: VersionEvidence) -> dict[str, Any]:
    """The evidence's headline numbers (plain JSON)."""
    return {"requests": ev.requests, "error_rate": ev.error_rate, "latency_p50_s": ev.latency_p50,
            "confidence_mean": ev.confidence_mean if ev.confidence_n else None, "noise_rate": ev.noise_rate,
            "feedback": ev.feedback_n, "accuracy": ev.accuracy, "shadow": ev.shadow_n,
            "shadow_agreement": ev.shadow_agreement, "drift_alarm": ev.drift_alarm}
