"""The canary rollout policy: from live evidence on a candidate adapter version and the stable one, answer wait,
advance, promote or roll back, with a reason and the numbers behind it.

Pure: no Ray, no database, no clock. A controller collects each stage's evidence (outcome rows per version),
calls :func:`decide` and acts on the answer; :func:`weights_for` gives the alias routes a stage needs.

**Stages.** ``-1`` is *shadow*: the stable version answers every request and ``shadow_share`` of them is also sent
to the candidate, whose outputs are recorded and compared with the stable ones, never returned. ``0 ..
len(steps) - 1`` are canary steps: the candidate answers ``steps[i]`` of the traffic. ``promote`` after the last
step (which is always 100%) makes the candidate the stable version.

**Decision order.**

1. *Broken*: a candidate whose requests all failed (at least :data:`BROKEN_MIN_REQUESTS`) is rolled back at once.
2. *Rollback* if any check **fails**: the candidate is worse than the baseline by more than the check's margin,
   significant at one-sided ``alpha`` (the one-sided ``1 - alpha`` lower bound of "how much worse" is above the
   margin). Significance replaces minimum counts here, so a clearly bad candidate is stopped early.
3. *Wait* while either version has fewer than ``min_requests`` in this stage or the stage is younger than
   ``min_stage_seconds``.
4. *Advance* (``promote`` at the last step) if every applicable check **passes** its non-inferiority test: the
   one-sided ``1 - alpha`` upper bound of "how much worse" is below the margin.
5. Otherwise *wait*: the evidence shows neither harm nor non-inferiority yet. Past ``max_stage_seconds`` the
   answer is still wait, flagged ``stalled``; a timeout never promotes.

Flagger and Argo Rollouts gate on fixed thresholds of point estimates (a Prometheus query per metric), which at low
traffic stall or fail on empty query results and say nothing about how sure the comparison is. Here "no evidence"
and "evidence of harm" are different answers: an inconclusive check holds the stage, it neither promotes nor rolls
back, and no input makes a rate divide by zero.

**Checks** (each reports candidate, baseline, difference, the tested ``worse_by`` with its one-sided bounds,
``p_worse`` for "worse by more than the margin" and ``p_noninferior`` for "worse by less than the margin"):

* ``error_rate`` (lower is better; margin ``max_error_rate_increase``, absolute): ``worse_by = p_c - p_b``.
  Newcombe's hybrid score bounds (his method 10) from Wilson intervals at ``z = z_{1-alpha}``:
  ``L = d - sqrt((p_c - l_c)^2 + (u_b - p_b)^2)``, ``U = d + sqrt((u_c - p_c)^2 + (p_b - l_b)^2)``. Wilson
  bounds stay inside [0, 1] and need no variance estimate, so zero counts (0 errors of 200) behave; a Wald
  z-test divides by zero there. The p-value is the ``alpha`` at which the bound meets the margin (bisection).
* ``noise_rate``: the same test on requests the monitor flagged noisy (margin ``max_noise_rate_increase``),
  reported and never a gate (verdict ``skipped``): a request's noise is scored on its input, which the version
  does not change, and routing is sticky per caller, so a difference between the two measures the callers each
  version was given (a bot sending OCR text hashed into the canary's share), not the candidate.
* ``accuracy``: the same test on wrong answers among labelled requests (margin ``max_accuracy_drop``), only when
  both versions have ``min_feedback`` labels; otherwise skipped.
* ``confidence`` (mean per-request mean token log-prob, higher is better; margin ``max_confidence_drop`` nats):
  Welch's t on ``worse_by = mean_b - mean_c``, ``se = sqrt(v_c/n_c + v_b/n_b)``, Welch-Satterthwaite degrees of
  freedom; H0 for rollback ``worse_by <= margin``. Only with at least 2 confidences per version.
* ``latency_p50`` (margin ``max_latency_ratio``): ``worse_by`` is the ratio of medians, tested on the log scale
  (latencies are skewed; a ratio is a difference of logs). Each log-median's standard error is distribution-free
  (Bonett & Price 2002, as statpsych's ``ci.median``): with ``o = round(n/2 - sqrt(n))`` the order statistics
  ``y_(o), y_(n-o+1)`` bracket the median with probability ``1 - 2P``, ``P = P(Bin(n, 1/2) <= o - 1)``, so
  ``se = (y_(n-o+1) - y_(o)) / (2 z_{1-P})``; then ``z = (log m_c - log m_b - log margin) / sqrt(se_c^2 +
  se_b^2)``. Deterministic (no bootstrap). Needs :data:`MIN_LATENCY_SAMPLES` per version to run, and
  ``min_requests`` per version to roll back: a stage's first requests pay adapter loading and cold caches.
* ``shadow_agreement`` (shadow stage only, when ``min_shadow_agreement > 0``): an exact binomial test of the
  share of shadow outputs equal to the stable output against the minimum, Clopper-Pearson bounds.
* ``drift`` (when ``rollback_on_drift``): fails when the candidate's drift alarm fired and the baseline's did not.

**No baseline** (the first version of an alias): the candidate necessarily takes all traffic, so stages mean
nothing and the answer is ``promote`` as soon as the candidate has ``min_requests`` and ``min_stage_seconds`` and
its error rate is shown below ``max_error_rate_increase`` read as an *absolute* ceiling (exact binomial test;
the missing baseline is taken as error-free). Every other check compares with a baseline or an input-dependent
rate (noise) and is skipped; the broken and drift rules still apply. ``rollback`` there means "abort".

**Error rates of the policy.** Promoting a worse version is the costly mistake; rolling back a good one costs a
redeploy. Advancing needs *every* check to pass at level ``alpha`` (an intersection-union test), which keeps the
chance of advancing a candidate worse by the margin on any one metric at most ``alpha`` per look, with no
multiplicity correction. Rollback fires on *any* failing check, each at ``alpha``: a candidate sitting exactly at
``m`` margins at once is rolled back with probability up to ``m * alpha``, one equal to the baseline far less
often. Both rates are per call: a controller calling :func:`decide` every few seconds on growing evidence tests
repeatedly and inflates them (as any unadjusted sequential test does); ``min_requests`` and ``min_stage_seconds``
delay the first look, and a strict guarantee needs few planned looks (e.g. at each doubling of requests) with
``alpha`` divided by their number.

**Sample sizes.** Showing non-inferiority on a rate ``p`` with margin ``d`` at power ``1 - beta`` needs about
``n = (z_{1-alpha} + z_{1-beta})^2 * 2 p (1 - p) / d^2`` requests per version: with the defaults (``d`` = 2
points, ``alpha`` = 0.05) and 80% power, ~310 at a 1% error rate and ~1,500 at 5%. A low-traffic alias therefore
waits long at a 5% step; a wider margin, a larger first step or a ``max_stage_seconds`` alert are the levers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SHADOW = -1
"""The stage index of the shadow stage."""

BROKEN_MIN_REQUESTS = 10
"""Requests, all failed, after which a candidate is rolled back without a significance test."""

MIN_LATENCY_SAMPLES = 10
"""Latencies per version below which the order-statistic standard error of a median is not meaningful."""

_LATENCY_FLOOR_S = 1e-6  # log(0) guard: a latency reported as 0 s is below any clock's resolution anyway
_Z_MAX = 40.0  # bisection bracket for signed z; Phi(-40) underflows to 0, so p-values saturate there
_NORMAL = NormalDist()

Action = Literal["wait", "advance", "promote", "rollback"]
Verdict = Literal["pass", "fail", "insufficient", "skipped"]
CheckValue = float | str | bool | None


class RolloutPlan(BaseModel):
    """How a candidate moves from shadow to stable, and the margins it must stay within.

    Margins are *non-inferiority* margins: how much worse than the stable version the candidate may be and still
    be promoted. Smaller margins protect more and need more traffic (see the module's sample-size note); a margin
    of 0 can only be met by a candidate measurably *better* than the baseline, so an equal one waits (and stalls).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    shadow_share: float = Field(default=0.2, ge=0, le=1,
                                description="Share of live requests also sent to the candidate in the shadow stage; "
                                            "0 skips the shadow stage (the rollout starts at canary step 0).")
    steps: tuple[float, ...] = Field(default=(0.05, 0.25, 0.5, 1.0), min_length=1,
                                     description="Candidate traffic share of each canary step: strictly increasing, "
                                                 "in (0, 1], ending at 1.0.")
    min_requests: int = Field(default=50, ge=1,
                              description="Requests per version in a stage before it may advance or promote.")
    min_stage_seconds: float = Field(default=30, ge=0,
                                     description="Seconds a stage lasts at least before it may advance or promote.")
    max_stage_seconds: float | None = Field(default=None, gt=0,
                                            description="After this long without enough evidence the decision is "
                                                        "still 'wait', flagged stalled=True for operators; never a "
                                                        "promotion on timeout. None: never stalled.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5,
                         description="One-sided significance of every rollback test and every non-inferiority bound.")
    max_error_rate_increase: float = Field(default=0.02, ge=0, le=1,
                                           description="Allowed error-rate increase, absolute (0.02 = 2 points). "
                                                       "Without a baseline: the absolute error-rate ceiling.")
    max_confidence_drop: float = Field(default=0.25, ge=0,
                                       description="Allowed drop of the mean per-token log-prob, in nats.")
    max_latency_ratio: float = Field(default=1.5, ge=1,
                                     description="Allowed candidate p50 / baseline p50 latency.")
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1,
                                     description="Allowed drop of feedback accuracy, absolute.")
    max_noise_rate_increase: float = Field(default=0.05, ge=0, le=1,
                                           description="Margin of the reported noise-rate comparison (not a gate: "
                                                       "the noise is the inputs', see the module docstring).")
    min_shadow_agreement: float = Field(default=0.0, ge=0, le=1,
                                        description="Shadow stage only: least share of shadow outputs equal to the "
                                                    "stable output; 0 disables the check. Only greedy "
                                                    "(temperature 0) requests are compared, the one case where "
                                                    "equal weights give equal answers: on sampled traffic the "
                                                    "check has nothing to count and the stage waits (set "
                                                    "max_stage_seconds to have it flagged).")
    min_feedback: int = Field(default=20, ge=1,
                              description="Labelled requests per version before accuracy is compared.")
    rollback_on_drift: bool = Field(default=False,
                                    description="Roll back when the candidate's drift alarm fired and the "
                                                "baseline's did not.")

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [s for s in v if not 0 < s <= 1]
        if bad:
            raise ValueError(f"steps must be traffic shares in (0, 1], got {list(v)}; {bad} out of range")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"steps must be strictly increasing, got {list(v)}; list each share once, smallest first")
        if v[-1] != 1.0:
            raise ValueError(f"the last step must be 1.0 (the candidate serves all traffic before it is promoted), "
                             f"got {list(v)}; append 1.0")
        return v

    @model_validator(mode="after")
    def _check_stage_times(self) -> RolloutPlan:
        if self.max_stage_seconds is not None and self.max_stage_seconds < self.min_stage_seconds:
            raise ValueError(f"max_stage_seconds ({self.max_stage_seconds}) is below min_stage_seconds "
                             f"({self.min_stage_seconds}); every stage would stall before it could advance")
        if self.shadow_share == 0 and len(self.steps) == 1:
            raise ValueError("with shadow_share 0 and the single step [1.0] the stable version never serves next to "
                             "the candidate, so there is nothing to compare it with; add a shadow share or a canary "
                             "step below 1.0")
        return self

    @property
    def first_stage(self) -> int:
        """Where a rollout against a baseline starts: the shadow stage, or step 0 when shadowing is off."""
        return SHADOW if self.shadow_share > 0 else 0

    @property
    def last_stage(self) -> int:
        return len(self.steps) - 1

    def stage_name(self, stage: int) -> str:
        """``'shadow (20% mirrored)'`` or ``'canary step 1 (25%)'``."""
        self.check_stage(stage)
        if stage == SHADOW:
            return f"shadow ({self.shadow_share:.0%} mirrored)"
        return f"canary step {stage} ({_share(self.steps[stage])})"

    def check_stage(self, stage: int) -> None:
        """Raise ``ValueError`` unless ``stage`` is a stage of this plan."""
        if stage == SHADOW and self.shadow_share == 0:
            raise ValueError("stage -1 (shadow) is disabled by shadow_share=0; start at stage 0 or set shadow_share")
        if not SHADOW <= stage <= self.last_stage:
            raise ValueError(f"stage must be -1 (shadow) or a canary step 0..{self.last_stage}, got {stage}")


def _ratio(part: int, whole: int) -> float | None:
    """``part / whole``, or None when nothing was seen (a check then has no data, rather than a 0)."""
    return part / whole if whole else None


@dataclass(frozen=True)
class VersionEvidence:
    """What one version did during one stage (the baseline's evidence should cover the same time window, so
    that time-of-day effects cancel).

    ``confidence_mean`` / ``confidence_var`` are the mean and sample variance (``n - 1``) over requests of each
    request's mean per-token log-prob, from ``confidence_n`` requests. ``shadow_n`` / ``shadow_agree``: shadow
    outputs compared with the stable output, and how many were equal. Fields default to "nothing seen", which
    skips the check they feed.
    """

    requests: int = 0
    errors: int = 0
    latencies_s: tuple[float, ...] = ()
    confidence_n: int = 0
    confidence_mean: float = 0.0
    confidence_var: float = 0.0
    noisy: int = 0
    feedback_n: int = 0
    feedback_correct: int = 0
    shadow_n: int = 0
    shadow_agree: int = 0
    drift_alarm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "latencies_s", tuple(float(x) for x in self.latencies_s))
        for name in ("requests", "errors", "confidence_n", "noisy", "feedback_n", "feedback_correct", "shadow_n",
                     "shadow_agree"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for part, whole in (("errors", "requests"), ("noisy", "requests"), ("feedback_correct", "feedback_n"),
                            ("shadow_agree", "shadow_n")):
            if getattr(self, part) > getattr(self, whole):
                raise ValueError(f"{part} ({getattr(self, part)}) cannot exceed {whole} ({getattr(self, whole)})")
        if not (math.isfinite(self.confidence_mean) and math.isfinite(self.confidence_var)
                and self.confidence_var >= 0):
            raise ValueError(f"confidence_mean must be finite and confidence_var finite and >= 0, got "
                             f"{self.confidence_mean} and {self.confidence_var}")
        if any(not (math.isfinite(x) and x >= 0) for x in self.latencies_s):
            raise ValueError("latencies_s must be finite and >= 0 seconds")

    @property
    def error_rate(self) -> float | None:
        return _ratio(self.errors, self.requests)

    @property
    def noise_rate(self) -> float | None:
        return _ratio(self.noisy, self.requests)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.feedback_correct, self.feedback_n)

    @property
    def shadow_agreement(self) -> float | None:
        return _ratio(self.shadow_agree, self.shadow_n)

    @property
    def latency_p50(self) -> float | None:
        return statistics.median(self.latencies_s) if self.latencies_s else None

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], *, drift_alarm: bool = False) -> VersionEvidence:
        """Summarise per-request outcome rows of one version in one stage.

        Each row has ``ok`` (required) and optionally ``latency_s``, ``confidence``, ``noisy``, ``correct``,
        ``agree``; ``None`` (SQL NULL) or a missing key means unknown. Booleans may be 0/1 integers.
        Latencies count from successful requests only: a failure's latency measures the failure path (a fast
        reject or a timeout), which would pull the median either way; failures are judged by the error rate.
        Mean and variance of the confidences use Welford's update, stable for long streams of similar values.
        """
        requests = errors = noisy = fb_n = fb_ok = sh_n = sh_ok = 0
        latencies: list[float] = []
        conf_n, conf_mean, conf_m2 = 0, 0.0, 0.0
        for i, row in enumerate(records):
            ok = row.get("ok")
            if ok is None:
                raise ValueError(f"record {i} has no 'ok'; every outcome row must say whether the request succeeded")
            requests += 1
            if not ok:
                errors += 1
            latency = row.get("latency_s")
            if ok and latency is not None:
                latencies.append(_finite(latency, i, "latency_s"))
            confidence = row.get("confidence")
            if confidence is not None:
                x = _finite(confidence, i, "confidence")
                conf_n += 1
                delta = x - conf_mean
                conf_mean += delta / conf_n
                conf_m2 += delta * (x - conf_mean)
            if row.get("noisy"):
                noisy += 1
            correct = row.get("correct")
            if correct is not None:
                fb_n += 1
                fb_ok += bool(correct)
            agree = row.get("agree")
            if agree is not None:
                sh_n += 1
                sh_ok += bool(agree)
        return cls(requests=requests, errors=errors, latencies_s=tuple(latencies), confidence_n=conf_n,
                   confidence_mean=conf_mean if conf_n else 0.0,
                   confidence_var=conf_m2 / (conf_n - 1) if conf_n > 1 else 0.0, noisy=noisy, feedback_n=fb_n,
                   feedback_correct=fb_ok, shadow_n=sh_n, shadow_agree=sh_ok, drift_alarm=drift_alarm)


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one stage.

    ``reason`` is one sentence naming the deciding metric and its numbers. ``checks`` maps each check name to its
    numbers: ``candidate``, ``baseline``, ``difference`` (candidate - baseline), ``worse_by`` (the tested
    quantity, positive = worse; a ratio for latency), ``margin``, ``lower`` / ``upper`` (one-sided ``1 - alpha``
    bounds of ``worse_by``), ``p_worse`` (H0: worse_by <= margin), ``p_noninferior`` (H0: worse_by >= margin),
    ``n_candidate``, ``n_baseline``, ``verdict`` (``pass``, ``fail``, ``insufficient``: neither shown yet, or
    ``skipped``: the check does not apply) and ``note``. ``stalled``: still waiting past ``max_stage_seconds``.
    """

    action: Action
    reason: str
    checks: dict[str, dict[str, CheckValue]] = field(default_factory=dict)
    stalled: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only; non-finite numbers become ``None`` (valid with ``allow_nan=False``)."""
        return {"action": self.action, "reason": self.reason, "stalled": self.stalled,
                "checks": {name: {k: _plain(v) for k, v in c.items()} for name, c in self.checks.items()}}


def weights_for(stage: int, plan: RolloutPlan, candidate_key: str,
                baseline_key: str | None) -> tuple[dict[str, float], float]:
    """The alias routes ``{version key: traffic share}`` and the shadow share for ``stage``.

    Shadow stage: the baseline serves everything and ``plan.shadow_share`` is mirrored to the candidate. Canary
    step ``i``: candidate ``steps[i]``, baseline ``1 - steps[i]``, zero shares dropped. Without a baseline the
    candidate serves everything at every stage (there is nothing to split with).
    """
    plan.check_stage(stage)
    if baseline_key is None:
        return {candidate_key: 1.0}, 0.0
    if baseline_key == candidate_key:
        raise ValueError(f"candidate and baseline are the same version {candidate_key!r}; nothing to roll out")
    if stage == SHADOW:
        return {baseline_key: 1.0}, plan.shadow_share
    share = plan.steps[stage]
    routes = {candidate_key: share, baseline_key: 1.0 - share}
    return {k: w for k, w in routes.items() if w > 0}, 0.0


def decide(plan: RolloutPlan, stage: int, stage_seconds: float, candidate: VersionEvidence,
           baseline: VersionEvidence | None) -> Decision:
    """Wait, advance, promote or roll back, from this stage's evidence (see the module docstring for the rules).

    Args:
        plan: the rollout plan.
        stage: ``-1`` shadow, ``0 .. len(plan.steps) - 1`` the canary step now running.
        stage_seconds: how long this stage has run.
        candidate: the candidate's evidence in this stage (in the shadow stage: its shadowed requests).
        baseline: the stable version's evidence over the same window; ``None`` for the first version of an alias.
    """
    plan.check_stage(stage)
    if not (math.isfinite(stage_seconds) and stage_seconds >= 0):
        raise ValueError(f"stage_seconds must be finite and >= 0, got {stage_seconds}")
    checks = _run_checks(plan, stage, candidate, baseline)
    table = {c.name: c.numbers for c in checks}

    failed = sorted((c for c in checks if c.verdict == "fail"), key=lambda c: c.p_worse)
    if failed:
        reason = failed[0].summary
        if len(failed) > 1:
            reason += f"; also failing: {', '.join(c.name for c in failed[1:])}"
        return Decision("rollback", reason, table)

    stalled = plan.max_stage_seconds is not None and stage_seconds >= plan.max_stage_seconds
    stall_note = (f"; stalled: {stage_seconds:.0f} s in this stage, past max_stage_seconds="
                  f"{plan.max_stage_seconds:.0f}, a timeout never promotes" if stalled else "")
    missing = []
    for who, ev in (("candidate", candidate), ("baseline", baseline)):
        if ev is not None and ev.requests < plan.min_requests:
            missing.append(f"{who} needs {plan.min_requests - ev.requests} more requests "
                           f"({ev.requests}/{plan.min_requests})")
    if stage_seconds < plan.min_stage_seconds:
        missing.append(f"the stage needs {math.ceil(plan.min_stage_seconds - stage_seconds)} more seconds "
                       f"({stage_seconds:.0f}/{plan.min_stage_seconds:.0f} s)")
    if missing:
        return Decision("wait", f"waiting: {', '.join(missing)}{stall_note}", table, stalled)

    pending = [c for c in checks if c.verdict == "insufficient"]
    if pending:
        return Decision("wait", f"waiting for evidence: {'; '.join(c.summary for c in pending)}{stall_note}",
                        table, stalled)
    if baseline is None:
        return Decision("promote", f"first version of the alias: {checks[0].summary}; promoting", table)
    if stage == plan.last_stage:
        return Decision("promote", f"all checks within their margins at {plan.stage_name(stage)}; promoting", table)
    return Decision("advance", f"all checks within their margins at {plan.stage_name(stage)}; advancing to "
                               f"{plan.stage_name(stage + 1)}", table)


# ---- checks -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Check:
    name: str
    verdict: Verdict
    summary: str  # the clause a reason quotes, with the numbers
    numbers: dict[str, CheckValue]
    p_worse: float = 1.0  # orders failures: the most significant one becomes the reason


def _run_checks(plan: RolloutPlan, stage: int, c: VersionEvidence, b: VersionEvidence | None) -> list[_Check]:
    if b is None:
        checks = [_absolute_error_check(plan, c)]
        for name, label in (("noise_rate", "noise rate"), ("accuracy", "feedback accuracy"),
                            ("confidence", "confidence"), ("latency_p50", "p50 latency"),
                            ("shadow_agreement", "shadow agreement")):
            checks.append(_skipped(name, label, "no baseline to compare with"))
    else:
        checks = [
            _error_check(plan, c, b),
            _reported(_rate_check("noise_rate", "noise rate", c.noisy, c.requests, b.noisy, b.requests,
                                  plan.max_noise_rate_increase, plan.alpha),
                      "the input's noise, which the version does not change: reported, not a gate"),
            _accuracy_check(plan, c, b),
            _confidence_check(plan, c, b),
            _latency_check(plan, c, b),
            _shadow_check(plan, c) if stage == SHADOW and plan.min_shadow_agreement > 0
            else _skipped("shadow_agreement", "shadow agreement",
                          "shadow stage only" if stage != SHADOW else "disabled (min_shadow_agreement=0)"),
        ]
    checks.append(_drift_check(plan, c, b))
    return checks


def _error_check(plan: RolloutPlan, c: VersionEvidence, b: VersionEvidence) -> _Check:
    check = _rate_check("error_rate", "error rate", c.errors, c.requests, b.errors, b.requests,
                        plan.max_error_rate_increase, plan.alpha)
    return _broken(c, check) or check


def _broken(c: VersionEvidence, check: _Check) -> _Check | None:
    """Every request failing is a deterministic fault (adapter fails to load, shape mismatch), not bad luck:
    10 failures in 10 happen less than once in 1,000 tries for a version that fails half the time. Waiting for
    significance against the margin, or for ``min_requests``, would only fail more users (or, against a clean
    baseline at 10 requests, need the baseline's evidence too), so this rolls back at once."""
    if c.requests < BROKEN_MIN_REQUESTS or c.errors < c.requests:
        return None
    numbers = dict(check.numbers, verdict="fail", note=f"all {c.requests} requests failed")
    return _Check(check.name, "fail", f"all {c.requests} candidate requests failed (error rate 100%)", numbers,
                  p_worse=0.0)


def _rate_check(name: str, label: str, xc: int, nc: int, xb: int, nb: int, margin: float, alpha: float, *,
                higher_is_better: bool = False) -> _Check:
    """Two-proportion non-inferiority check on "bad" outcomes (``x`` bad of ``n``; for a higher-is-better rate
    the caller passes successes and the check counts ``n - x``)."""
    if nc == 0 or nb == 0:
        return _insufficient(name, label, f"{label}: no requests yet from the "
                                          f"{'candidate' if nc == 0 else 'baseline'}",
                             n_candidate=nc, n_baseline=nb, margin=margin)
    bad_c, bad_b = (nc - xc, nb - xb) if higher_is_better else (xc, xb)
    rate_c, rate_b = xc / nc, xb / nb
    worse_by = bad_c / nc - bad_b / nb
    z_alpha = _NORMAL.inv_cdf(1 - alpha)
    lower, upper = _newcombe(bad_c, nc, bad_b, nb, z_alpha)
    z = _signed_z(lambda t: _newcombe(bad_c, nc, bad_b, nb, t), worse_by, margin)
    p_worse, p_ok = _NORMAL.cdf(-z), _NORMAL.cdf(z)
    verdict = _verdict(p_worse, p_ok, alpha)
    numbers = _numbers(rate_c, rate_b, rate_c - rate_b, worse_by, margin, lower, upper, p_worse, p_ok, nc, nb,
                       verdict)
    diff = f"{100 * (rate_c - rate_b):+.1f} points"
    if higher_is_better:
        diff += ", a drop"
    head = f"{label} {_pct(rate_c)} vs {_pct(rate_b)}"
    if verdict == "fail":
        summary = f"{head} ({diff} > {100 * margin:.1f}, {_p(p_worse)})"
    elif verdict == "pass":
        summary = f"{head} ({diff}; upper bound {100 * upper:+.1f} < {100 * margin:.1f})"
    else:
        summary = f"{head} ({diff}; upper bound {100 * upper:+.1f} not yet below {100 * margin:.1f}, {_p(p_worse)})"
    return _Check(name, verdict, summary, numbers, p_worse)


def _accuracy_check(plan: RolloutPlan, c: VersionEvidence, b: VersionEvidence) -> _Check:
    if min(c.feedback_n, b.feedback_n) < plan.min_feedback:
        return _skipped("accuracy", "feedback accuracy",
                        f"needs {plan.min_feedback} labelled requests per version, have {c.feedback_n} "
                        f"(candidate) and {b.feedback_n} (baseline)")
    return _rate_check("accuracy", "feedback accuracy", c.feedback_correct, c.feedback_n, b.feedback_correct,
                       b.feedback_n, plan.max_accuracy_drop, plan.alpha, higher_is_better=True)


def _absolute_error_check(plan: RolloutPlan, c: VersionEvidence) -> _Check:
    """No baseline: is the error rate below ``max_error_rate_increase`` taken as an absolute ceiling?"""
    name, label, ceiling = "error_rate", "error rate", plan.max_error_rate_increase
    if c.requests == 0:
        return _insufficient(name, label, "error rate: no requests yet", n_candidate=0, margin=ceiling)
    rate = c.error_rate or 0.0
    p_worse = _binom_sf(c.errors, c.requests, ceiling)  # P(X >= k | ceiling): many errors refute "rate <= ceiling"
    p_ok = _binom_cdf(c.errors, c.requests, ceiling)  # P(X <= k | ceiling): few errors refute "rate >= ceiling"
    lower, upper = _clopper_pearson(c.errors, c.requests, plan.alpha)
    verdict = _verdict(p_worse, p_ok, plan.alpha)
    numbers = _numbers(rate, None, None, rate, ceiling, lower, upper, p_worse, p_ok, c.requests, None, verdict)
    numbers["note"] = "no baseline: the margin is an absolute ceiling"
    head = f"error rate {_pct(rate)} of {c.requests} with no baseline"
    if verdict == "fail":
        summary = f"{head} (> ceiling {_pct(ceiling)}, {_p(p_worse)})"
    elif verdict == "pass":
        summary = f"{head} (upper bound {_pct(upper)} < ceiling {_pct(ceiling)})"
    else:
        summary = f"{head} (upper bound {_pct(upper)} not yet below ceiling {_pct(ceiling)})"
    check = _Check(name, verdict, summary, numbers, p_worse)
    return _broken(c, check) or check


def _confidence_check(plan: RolloutPlan, c: VersionEvidence, b: VersionEvidence) -> _Check:
    name, label, margin = "confidence", "mean token log-prob", plan.max_confidence_drop
    if min(c.confidence_n, b.confidence_n) < 2:
        return _skipped(name, label, f"needs 2 confidences per version, have {c.confidence_n} (candidate) and "
                                     f"{b.confidence_n} (baseline)")
    worse_by = b.confidence_mean - c.confidence_mean
    var_c, var_b = c.confidence_var / c.confidence_n, b.confidence_var / b.confidence_n
    se = math.sqrt(var_c + var_b)
    if se > 0:
        df = (var_c + var_b) ** 2 / (var_c**2 / (c.confidence_n - 1) + var_b**2 / (b.confidence_n - 1))
        t = (worse_by - margin) / se
        p_worse, p_ok = _t_sf(t, df), _t_sf(-t, df)
        q = _t_quantile(1 - plan.alpha, df)
        lower, upper = worse_by - q * se, worse_by + q * se
    else:  # both samples constant: the means are what they are
        p_worse = 0.0 if worse_by > margin else 1.0 if worse_by < margin else 0.5
        p_ok = 1.0 - p_worse
        lower = upper = worse_by
    verdict = _verdict(p_worse, p_ok, plan.alpha)
    numbers = _numbers(c.confidence_mean, b.confidence_mean, c.confidence_mean - b.confidence_mean, worse_by,
                       margin, lower, upper, p_worse, p_ok, c.confidence_n, b.confidence_n, verdict)
    head = f"{label} {c.confidence_mean:.2f} vs {b.confidence_mean:.2f}"
    if verdict == "fail":
        summary = f"{head} (drop {worse_by:.2f} nats > {margin:.2f}, {_p(p_worse)})"
    elif verdict == "pass":
        summary = f"{head} (drop {worse_by:.2f} nats; upper bound {upper:.2f} < {margin:.2f})"
    else:
        summary = f"{head} (drop {worse_by:.2f} nats; upper bound {upper:.2f} not yet below {margin:.2f}, " \
                  f"{_p(p_worse)})"
    return _Check(name, verdict, summary, numbers, p_worse)


def _latency_check(plan: RolloutPlan, c: VersionEvidence, b: VersionEvidence) -> _Check:
    name, label, margin = "latency_p50", "p50 latency", plan.max_latency_ratio
    nc, nb = len(c.latencies_s), len(b.latencies_s)
    if nc == 0 and nb == 0:
        return _skipped(name, label, "no latencies recorded")
    if min(nc, nb) < MIN_LATENCY_SAMPLES:
        return _insufficient(name, label, f"p50 latency: needs {MIN_LATENCY_SAMPLES} latencies per version, have "
                                          f"{nc} (candidate) and {nb} (baseline)",
                             n_candidate=nc, n_baseline=nb, margin=margin)
    log_c = sorted(math.log(max(x, _LATENCY_FLOOR_S)) for x in c.latencies_s)
    log_b = sorted(math.log(max(x, _LATENCY_FLOOR_S)) for x in b.latencies_s)
    log_ratio = statistics.median(log_c) - statistics.median(log_b)
    se = math.hypot(_median_se(log_c), _median_se(log_b))
    if se > 0:
        z = (log_ratio - math.log(margin)) / se
        p_worse, p_ok = _NORMAL.cdf(-z), _NORMAL.cdf(z)
    else:  # identical order statistics (heavily quantised clocks): compare the ratio itself
        p_worse = 0.0 if log_ratio > math.log(margin) else 1.0 if log_ratio < math.log(margin) else 0.5
        p_ok = 1.0 - p_worse
    z_alpha = _NORMAL.inv_cdf(1 - plan.alpha)
    ratio, lower, upper = math.exp(log_ratio), math.exp(log_ratio - z_alpha * se), math.exp(log_ratio + z_alpha * se)
    verdict = _verdict(p_worse, p_ok, plan.alpha)
    p50_c, p50_b = statistics.median(c.latencies_s), statistics.median(b.latencies_s)
    numbers = _numbers(p50_c, p50_b, p50_c - p50_b, ratio, margin, lower, upper, p_worse, p_ok, nc, nb, verdict)
    head = f"{label} {p50_c:.3f} s vs {p50_b:.3f} s"
    if verdict == "fail" and min(nc, nb) < plan.min_requests:
        verdict = "insufficient"
        numbers.update(verdict=verdict, note=f"a latency rollback needs {plan.min_requests} latencies per version: "
                                             f"a stage's first requests pay adapter loading and cold caches")
        summary = f"{head} (ratio {ratio:.2f} > {margin:.2f}, {_p(p_worse)}, but only {min(nc, nb)} latencies " \
                  f"of {plan.min_requests} needed to act on it)"
    elif verdict == "fail":
        summary = f"{head} (ratio {ratio:.2f} > {margin:.2f}, {_p(p_worse)})"
    elif verdict == "pass":
        summary = f"{head} (ratio {ratio:.2f}; upper bound {upper:.2f} < {margin:.2f})"
    else:
        summary = f"{head} (ratio {ratio:.2f}; upper bound {upper:.2f} not yet below {margin:.2f}, {_p(p_worse)})"
    return _Check(name, verdict, summary, numbers, p_worse)


def _shadow_check(plan: RolloutPlan, c: VersionEvidence) -> _Check:
    name, label, minimum = "shadow_agreement", "shadow agreement", plan.min_shadow_agreement
    if c.shadow_n == 0:
        return _insufficient(name, label, "shadow agreement: no shadow outputs compared yet (only greedy, "
                             "temperature-0 requests are compared)", n_candidate=0, margin=0.0)
    k, n = c.shadow_agree, c.shadow_n
    agreement = k / n
    p_worse = _binom_cdf(k, n, minimum)  # H0: agreement >= minimum; few agreements refute it
    p_ok = _binom_sf(k, n, minimum)  # H0: agreement <= minimum
    low, high = _clopper_pearson(k, n, plan.alpha)
    verdict = _verdict(p_worse, p_ok, plan.alpha)
    # worse_by = minimum - agreement, so that, as for every check, positive is worse and the margin is 0
    numbers = _numbers(agreement, None, None, minimum - agreement, 0.0, minimum - high, minimum - low, p_worse,
                       p_ok, n, None, verdict)
    numbers["minimum"] = minimum
    head = f"shadow agreement {_pct(agreement)} of {n}"
    if verdict == "fail":
        summary = f"{head} (< minimum {_pct(minimum)}; upper bound {_pct(high)}, {_p(p_worse)})"
    elif verdict == "pass":
        summary = f"{head} (lower bound {_pct(low)} >= minimum {_pct(minimum)})"
    else:
        summary = f"{head} (lower bound {_pct(low)} not yet above minimum {_pct(minimum)}, {_p(p_worse)})"
    return _Check(name, verdict, summary, numbers, p_worse)


def _drift_check(plan: RolloutPlan, c: VersionEvidence, b: VersionEvidence | None) -> _Check:
    if not plan.rollback_on_drift:
        return _skipped("drift", "drift", "disabled (rollback_on_drift=False)")
    base_alarm = b is not None and b.drift_alarm
    # An alarm on both versions is a change in the traffic, not in the candidate.
    failed = c.drift_alarm and not base_alarm
    numbers: dict[str, CheckValue] = {"candidate": c.drift_alarm, "baseline": base_alarm if b is not None else None,
                                      "verdict": "fail" if failed else "pass", "note": None}
    if failed:
        summary = "drift alarm on the candidate " + ("and not on the baseline" if b is not None else "(no baseline)")
        return _Check("drift", "fail", summary, numbers, p_worse=0.0)
    return _Check("drift", "pass", "no candidate-only drift alarm", numbers)


def _reported(check: _Check, note: str) -> _Check:
    """``check``'s numbers, shown with the others, and a ``skipped`` verdict: it never moves a decision."""
    return _Check(check.name, "skipped", f"{check.summary} ({note})",
                  {**check.numbers, "verdict": "skipped", "note": note, "measured": check.verdict})


def _skipped(name: str, label: str, note: str) -> _Check:
    return _Check(name, "skipped", f"{label}: skipped, {note}", {"verdict": "skipped", "note": note})


def _insufficient(name: str, label: str, summary: str, *, n_candidate: int, n_baseline: int | None = None,
                  margin: float) -> _Check:
    numbers: dict[str, CheckValue] = {"n_candidate": n_candidate, "n_baseline": n_baseline, "margin": margin,
                                      "verdict": "insufficient", "note": summary}
    return _Check(name, "insufficient", summary, numbers)


def _verdict(p_worse: float, p_ok: float, alpha: float) -> Verdict:
    # alpha < 0.5, so at most one of the two one-sided tests can reject
    if p_worse < alpha:
        return "fail"
    return "pass" if p_ok < alpha else "insufficient"


def _numbers(candidate: float, baseline: float | None, difference: float | None, worse_by: float, margin: float,
             lower: float, upper: float, p_worse: float, p_ok: float, n_candidate: int, n_baseline: int | None,
             verdict: Verdict) -> dict[str, CheckValue]:
    return {"candidate": candidate, "baseline": baseline, "difference": difference, "worse_by": worse_by,
            "margin": margin, "lower": lower, "upper": upper, "p_worse": p_worse, "p_noninferior": p_ok,
            "n_candidate": n_candidate, "n_baseline": n_baseline, "verdict": verdict, "note": None}


# ---- statistics (stdlib only: no scipy dependency) ----------------------------------------------------------------
def _wilson(x: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for ``x / n`` at normal quantile ``z``."""
    p, z2 = x / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _newcombe(x1: int, n1: int, x2: int, n2: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score bounds for ``p1 - p2`` (each bound one-sided at ``Phi(z)``)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = _wilson(x1, n1, z)
    l2, u2 = _wilson(x2, n2, z)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def _signed_z(bounds: Callable[[float], tuple[float, float]], estimate: float, margin: float) -> float:
    """The ``z`` at which a bound of ``estimate`` meets ``margin``: positive when the lower bound at ``z`` is
    the one that meets it (evidence of "worse than the margin"), negative for the upper bound. So ``Phi(-z)``
    is the p-value of H0 ``true <= margin`` and ``Phi(z)`` that of H0 ``true >= margin``."""
    if estimate == margin:
        return 0.0
    above = estimate > margin
    lo, hi = 0.0, _Z_MAX
    side = 0 if above else 1
    if (bounds(hi)[side] > margin) == above:
        return _Z_MAX if above else -_Z_MAX
    for _ in range(50):
        mid = (lo + hi) / 2
        if (bounds(mid)[side] > margin) == above:
            lo = mid
        else:
            hi = mid
    z = (lo + hi) / 2
    return z if above else -z


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` (Lentz's continued fraction, Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast below the mean of the distribution; above it use I_x(a, b) = 1 - I_{1-x}(b, a)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _binom_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Bin(n, p)``."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    return _betainc(n - k, k + 1, 1 - p)


def _binom_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Bin(n, p)``."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    return _betainc(k, n - k + 1, p)


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact one-sided ``1 - alpha`` lower and upper bounds of a binomial proportion."""
    lower = 0.0 if k == 0 else _bisect(lambda p: _binom_sf(k, n, p) - alpha, 0.0, 1.0)
    upper = 1.0 if k == n else _bisect(lambda p: alpha - _binom_cdf(k, n, p), 0.0, 1.0)
    return lower, upper


def _bisect(f: Callable[[float], float], lo: float, hi: float, iterations: int = 60) -> float:
    """The root of an increasing ``f`` on ``[lo, hi]``."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _t_sf(t: float, df: float) -> float:
    """``P(T > t)`` for Student's t with ``df`` (real) degrees of freedom."""
    if df > 1e4:  # t_{0.95} differs from z_{0.95} by < 1e-4 there, and the fraction needs O(sqrt(df)) terms
        return _NORMAL.cdf(-t)
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def _t_quantile(q: float, df: float) -> float:
    """The ``q``-quantile (``q > 0.5``) of Student's t."""
    hi = max(1.0, _NORMAL.inv_cdf(q))
    while _t_sf(hi, df) > 1 - q:
        hi *= 2
    return _bisect(lambda t: (1 - q) - _t_sf(t, df), 0.0, hi)


def _median_se(sorted_x: list[float]) -> float:
    """Distribution-free standard error of the median of ``sorted_x`` (Bonett & Price 2002)."""
    n = len(sorted_x)
    o = max(1, round(n / 2 - math.sqrt(n)))
    tail = _binom_cdf(o - 1, n, 0.5)  # P(median outside [x_(o), x_(n-o+1)]) / 2
    return (sorted_x[n - o] - sorted_x[o - 1]) / (2 * _NORMAL.inv_cdf(1 - tail))


# ---- formatting ---------------------------------------------------------------------------------------------------
def _finite(value: Any, index: int, key: str) -> float:
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"record {index} has a non-finite {key} ({value!r}); use None for unknown")
    return x


def _share(x: float) -> str:
    return f"{100 * x:g}%"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.4f}"


def _plain(v: CheckValue) -> CheckValue:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return int(v)
    x = float(v)
    return x if math.isfinite(x) else None
