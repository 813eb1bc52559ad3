"""The canary rollout policy: plan validation, wait/advance/promote/rollback on each metric, calibration of the
rollback and non-inferiority tests by simulation, JSON output, and the alias routes per stage."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from pydantic import ValidationError

from tsugiki.adapters import rollout
from tsugiki.adapters.rollout import Decision, RolloutPlan, VersionEvidence, decide, weights_for

PLAN = RolloutPlan()
LONG = 120.0  # seconds: past min_stage_seconds


def ev(requests: int = 0, errors: int = 0, **kw: object) -> VersionEvidence:
    return VersionEvidence(requests=requests, errors=errors, **kw)  # type: ignore[arg-type]


def latencies(median: float, n: int, seed: int) -> tuple[float, ...]:
    return tuple(np.random.default_rng(seed).lognormal(math.log(median), 0.5, n).tolist())


def healthy(n: int = 2000, seed: int = 0) -> VersionEvidence:
    """A version with 1% errors, 2% noisy inputs, typical latencies and confidences."""
    return ev(n, n // 100, noisy=n // 50, latencies_s=latencies(0.2, n, seed), confidence_n=n,
              confidence_mean=-1.0, confidence_var=0.25)


# ---- plan -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": (0.05, 0.5, 0.25, 1.0)}, r"steps must be strictly increasing, got \[0.05, 0.5, 0.25, 1.0\]"),
    ({"steps": (0.1, 0.1, 1.0)}, "strictly increasing"),
    ({"steps": (0.05, 0.5)}, r"the last step must be 1.0 .* got \[0.05, 0.5\]; append 1.0"),
    ({"steps": (0.0, 1.0)}, r"steps must be traffic shares in \(0, 1\], got \[0.0, 1.0\]"),
    ({"steps": (0.5, 1.5)}, r"\[1.5\] out of range"),
    ({"steps": ()}, "at least 1 item"),
    ({"alpha": 0.5}, "alpha"),
    ({"min_requests": 0}, "min_requests"),
    ({"max_latency_ratio": 0.9}, "max_latency_ratio"),
    ({"shadow_share": float("nan")}, "shadow_share"),
    ({"min_stage_seconds": 60, "max_stage_seconds": 30}, r"max_stage_seconds \(30.0\) is below min_stage_seconds"),
    ({"min_requets": 10}, "Extra inputs are not permitted"),
])
def test_plan_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RolloutPlan(**kwargs)  # type: ignore[arg-type]


def test_plan_is_frozen_and_names_its_stages() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        PLAN.alpha = 0.1  # type: ignore[misc]
    assert RolloutPlan(steps=[0.5, 1]).steps == (0.5, 1.0)
    assert (PLAN.first_stage, PLAN.last_stage) == (-1, 3)
    assert RolloutPlan(shadow_share=0).first_stage == 0
    assert PLAN.stage_name(-1) == "shadow (20% mirrored)"
    assert PLAN.stage_name(1) == "canary step 1 (25%)"
    with pytest.raises(ValueError, match=r"stage must be -1 \(shadow\) or a canary step 0..3, got 4"):
        decide(PLAN, 4, LONG, healthy(), healthy())
    with pytest.raises(ValueError, match=r"shadow\) is disabled by shadow_share=0"):
        decide(RolloutPlan(shadow_share=0), -1, LONG, healthy(), healthy())
    with pytest.raises(ValueError, match="stage_seconds must be finite and >= 0, got nan"):
        decide(PLAN, 0, float("nan"), healthy(), healthy())


# ---- evidence -------------------------------------------------------------------------------------------------------
def test_evidence_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match=r"errors \(5\) cannot exceed requests \(4\)"):
        ev(4, 5)
    with pytest.raises(ValueError, match=r"shadow_agree \(3\) cannot exceed shadow_n \(2\)"):
        ev(shadow_n=2, shadow_agree=3)
    with pytest.raises(ValueError, match="requests must be >= 0, got -1"):
        ev(-1)
    with pytest.raises(ValueError, match="confidence_var finite and >= 0"):
        ev(confidence_n=3, confidence_var=-1.0)
    with pytest.raises(ValueError, match="latencies_s must be finite"):
        ev(3, latencies_s=(0.1, float("inf")))


def test_from_records_counts_and_stable_moments() -> None:
    # confidences far from 0 with a tiny spread: the naive sum-of-squares variance loses every digit here
    confs = [-1e9 + x for x in (0.1, 0.2, 0.4, 0.7, 1.1)]
    rows = [{"ok": True, "latency_s": 0.1, "confidence": confs[0], "noisy": False, "correct": True, "agree": True},
            {"ok": 1, "latency_s": 0.3, "confidence": confs[1], "noisy": 1, "correct": 0, "agree": None},
            {"ok": False, "latency_s": 9.0, "confidence": confs[2], "noisy": None, "correct": None},
            {"ok": True, "latency_s": None, "confidence": confs[3], "agree": False},
            {"ok": True, "latency_s": 0.2, "confidence": confs[4]}]
    e = VersionEvidence.from_records(rows, drift_alarm=True)
    assert (e.requests, e.errors, e.noisy) == (5, 1, 1)
    assert e.latencies_s == (0.1, 0.3, 0.2)  # the failed request's 9 s is left out
    assert e.latency_p50 == 0.2
    assert (e.feedback_n, e.feedback_correct, e.shadow_n, e.shadow_agree) == (2, 1, 2, 1)
    assert e.drift_alarm
    exact = [0.1, 0.2, 0.4, 0.7, 1.1]
    assert e.confidence_n == 5
    assert e.confidence_mean == pytest.approx(-1e9 + statistics.mean(exact), abs=1e-6)
    assert e.confidence_var == pytest.approx(statistics.variance(exact), rel=1e-6)
    empty = VersionEvidence.from_records([])
    assert empty == VersionEvidence() and empty.error_rate is None and empty.latency_p50 is None
    with pytest.raises(ValueError, match="record 1 has no 'ok'"):
        VersionEvidence.from_records([{"ok": True}, {"latency_s": 0.1}])
    with pytest.raises(ValueError, match=r"record 0 has a non-finite confidence \(nan\)"):
        VersionEvidence.from_records([{"ok": True, "confidence": float("nan")}])


# ---- waiting --------------------------------------------------------------------------------------------------------
def test_low_traffic_waits_and_says_what_is_missing() -> None:
    d = decide(PLAN, 0, 10.0, healthy(12), healthy(30))
    assert d.action == "wait" and not d.stalled
    assert "candidate needs 38 more requests (12/50)" in d.reason
    assert "baseline needs 20 more requests (30/50)" in d.reason
    assert "the stage needs 20 more seconds (10/30 s)" in d.reason
    enough_requests = decide(PLAN, 0, 5.0, healthy(), healthy())
    assert enough_requests.action == "wait" and enough_requests.reason == \
        "waiting: the stage needs 25 more seconds (5/30 s)"


def test_zero_requests_everywhere_waits_without_nan() -> None:
    for candidate, baseline in ((ev(), ev()), (ev(), healthy()), (healthy(), ev())):
        d = decide(PLAN, 0, 0.0, candidate, baseline)
        assert d.action == "wait"
        json.dumps(d.to_json(), allow_nan=False)
    d = decide(PLAN, 0, 0.0, ev(), ev())
    assert "candidate needs 50 more requests (0/50)" in d.reason and "baseline needs 50 more" in d.reason
    assert d.checks["error_rate"]["verdict"] == "insufficient"
    assert decide(PLAN, 0, LONG, ev(), None).action == "wait"


def test_stalled_stage_keeps_waiting_and_never_promotes() -> None:
    plan = RolloutPlan(max_stage_seconds=600)
    low = decide(plan, 3, 700.0, healthy(20), healthy(20))
    assert (low.action, low.stalled) == ("wait", True)
    assert "stalled: 700 s in this stage, past max_stage_seconds=600" in low.reason
    # enough requests but inconclusive (error rate +4 points at n=100): still wait, stalled
    inconclusive = decide(plan, 3, 700.0, ev(100, 5), ev(100, 1))
    assert (inconclusive.action, inconclusive.stalled) == ("wait", True)
    assert not decide(plan, 3, 300.0, ev(100, 5), ev(100, 1)).stalled


# ---- rollback -------------------------------------------------------------------------------------------------------
def test_clearly_broken_candidate_rolls_back_on_error_rate() -> None:
    d = decide(PLAN, 0, 5.0, ev(200, 100), ev(200, 2))  # before min_stage_seconds: significance is enough
    assert d.action == "rollback"
    assert d.reason.startswith("error rate 50.0% vs 1.0% (+49.0 points > 2.0, p<0.0001)")
    c = d.checks["error_rate"]
    assert c["verdict"] == "fail" and c["candidate"] == 0.5 and c["baseline"] == 0.01
    assert isinstance(c["lower"], float) and c["lower"] > 0.02


def test_all_failed_candidate_rolls_back_at_ten_requests() -> None:
    for baseline in (ev(), ev(1000, 10), None):
        d = decide(PLAN, 0, 1.0, ev(10, 10), baseline)
        assert d.action == "rollback", baseline
        assert "all 10 candidate requests failed (error rate 100%)" in d.reason
    # nine failures and no baseline evidence to compare with: not yet
    assert decide(PLAN, 0, 1.0, ev(9, 9), ev()).action == "wait"


def test_worse_but_not_significant_at_small_n_waits() -> None:
    d = decide(PLAN, 0, LONG, ev(100, 5), ev(100, 1))
    assert d.action == "wait"
    assert d.checks["error_rate"]["verdict"] == "insufficient"
    assert "error rate 5.0% vs 1.0% (+4.0 points; upper bound" in d.reason and "not yet below 2.0" in d.reason


def test_noisier_callers_on_the_canary_neither_roll_it_back_nor_hold_it() -> None:
    """Noise is scored on the input, which the version does not change; sticky routing gave the canary a caller
    who sends OCR text (30% noisy against 2%): the candidate still advances, and the numbers are shown."""
    import dataclasses

    cand, base = dataclasses.replace(healthy(seed=1), noisy=600), healthy(seed=2)
    d = decide(PLAN, 0, LONG, cand, base)
    assert d.action == "advance", d.reason
    noise = d.checks["noise_rate"]
    assert noise["verdict"] == "skipped" and noise["measured"] == "fail" and noise["candidate"] == 0.3
    assert "reported, not a gate" in str(noise["note"])


def test_confidence_drop_beyond_margin_rolls_back() -> None:
    base = healthy()
    worse = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, confidence_n=2000, confidence_mean=-1.5,
               confidence_var=0.25)
    d = decide(PLAN, 1, LONG, worse, base)
    assert d.action == "rollback"
    assert d.reason.startswith("mean token log-prob -1.50 vs -1.00 (drop 0.50 nats > 0.25, p<0.0001)")
    within = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, confidence_n=2000, confidence_mean=-1.1,
                confidence_var=0.25)
    assert decide(PLAN, 1, LONG, within, base).checks["confidence"]["verdict"] == "pass"
    one = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, confidence_n=1, confidence_mean=-9.0)
    assert decide(PLAN, 1, LONG, one, base).checks["confidence"]["verdict"] == "skipped"


def test_latency_ratio_beyond_limit_rolls_back_with_enough_requests() -> None:
    slow = ev(200, 2, latencies_s=latencies(0.5, 200, 1))
    d = decide(PLAN, 1, LONG, slow, ev(200, 2, latencies_s=latencies(0.2, 200, 2)))
    assert d.action == "rollback" and d.reason.startswith("p50 latency")
    ratio = d.checks["latency_p50"]["worse_by"]
    assert isinstance(ratio, float) and 2.0 < ratio < 3.1 and "ratio" in d.reason
    # the same slowdown on 30 requests each: significant, but a stage's first requests pay adapter loading
    early = decide(PLAN, 1, LONG, ev(30, 0, latencies_s=latencies(0.5, 30, 1)),
                   ev(30, 0, latencies_s=latencies(0.2, 30, 2)))
    assert early.action == "wait" and early.checks["latency_p50"]["verdict"] == "insufficient"
    assert "adapter loading" in str(early.checks["latency_p50"]["note"])


def test_feedback_accuracy_drop_rolls_back_only_with_enough_labels() -> None:
    base = healthy()
    d = decide(PLAN, 1, LONG, ev(2000, 20, noisy=40, feedback_n=200, feedback_correct=140),
               ev(2000, 20, noisy=40, feedback_n=200, feedback_correct=180))
    assert d.action == "rollback"
    assert d.reason.startswith("feedback accuracy 70.0% vs 90.0% (-20.0 points, a drop > 2.0, p<0.0001)")
    few = decide(PLAN, 1, LONG, ev(2000, 20, noisy=40, latencies_s=base.latencies_s, feedback_n=10,
                                   feedback_correct=3),
                 ev(2000, 20, noisy=40, latencies_s=base.latencies_s, feedback_n=10, feedback_correct=9))
    assert few.action == "advance"
    assert few.checks["accuracy"] == {"verdict": "skipped", "note": "needs 20 labelled requests per version, "
                                                                    "have 10 (candidate) and 10 (baseline)"}


def test_shadow_agreement_applies_in_the_shadow_stage_only() -> None:
    plan = RolloutPlan(min_shadow_agreement=0.9)
    base = healthy()
    low = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, shadow_n=100, shadow_agree=60)
    d = decide(plan, -1, LONG, low, base)
    assert d.action == "rollback" and d.reason.startswith("shadow agreement 60.0% of 100 (< minimum 90.0%")
    high = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, shadow_n=100, shadow_agree=99)
    ok = decide(plan, -1, LONG, high, base)
    assert ok.action == "advance" and ok.reason.endswith("advancing to canary step 0 (5%)")
    assert ok.checks["shadow_agreement"]["verdict"] == "pass"
    assert decide(plan, -1, LONG, ev(2000, 20, noisy=40, latencies_s=base.latencies_s), base).action == "wait"
    assert decide(plan, 0, LONG, low, base).checks["shadow_agreement"]["verdict"] == "skipped"


def test_drift_alarm_rolls_back_only_when_enabled_and_candidate_only() -> None:
    plan = RolloutPlan(rollback_on_drift=True)
    base = healthy()
    drifted = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, drift_alarm=True)
    d = decide(plan, 1, LONG, drifted, base)
    assert (d.action, d.reason) == ("rollback", "drift alarm on the candidate and not on the baseline")
    both = ev(2000, 20, noisy=40, latencies_s=base.latencies_s, drift_alarm=True)
    assert decide(plan, 1, LONG, drifted, both).action == "advance"
    assert decide(PLAN, 1, LONG, drifted, base).checks["drift"]["verdict"] == "skipped"


# ---- advance and promote --------------------------------------------------------------------------------------------
def test_equal_candidate_advances_then_promotes_at_the_last_step() -> None:
    cand, base = healthy(seed=1), healthy(seed=2)
    shadow = decide(PLAN, -1, LONG, cand, base)
    assert shadow.action == "advance" and shadow.reason.endswith("advancing to canary step 0 (5%)")
    d = decide(PLAN, 0, LONG, cand, base)
    assert d.action == "advance"
    assert d.reason == "all checks within their margins at canary step 0 (5%); advancing to canary step 1 (25%)"
    assert {name: c["verdict"] for name, c in d.checks.items()} == {
        "error_rate": "pass", "noise_rate": "skipped", "accuracy": "skipped", "confidence": "pass",
        "latency_p50": "pass", "shadow_agreement": "skipped", "drift": "skipped"}
    last = decide(PLAN, 3, LONG, cand, base)
    assert last.action == "promote" and last.reason.endswith("at canary step 3 (100%); promoting")
    assert decide(PLAN, 0, LONG, cand, base) == d  # deterministic


def test_slightly_worse_candidate_within_margin_advances() -> None:
    d = decide(PLAN, 1, LONG, ev(5000, 75), ev(5000, 50))  # 1.5% vs 1.0%, margin 2 points
    assert d.action == "advance"
    c = d.checks["error_rate"]
    assert c["worse_by"] == pytest.approx(0.005)
    assert isinstance(c["upper"], float) and c["upper"] < 0.02 and c["verdict"] == "pass"


def test_first_version_without_baseline_uses_an_absolute_ceiling() -> None:
    ok = decide(PLAN, 0, LONG, ev(200, 0), None)  # 0.98^200 = 0.018 < alpha: below the 2% ceiling
    assert ok.action == "promote" and ok.reason.startswith("first version of the alias: error rate 0.0% of 200")
    assert ok.checks["latency_p50"]["note"] == "no baseline to compare with"
    assert decide(PLAN, 0, LONG, ev(50, 0), None).action == "wait"  # 0.98^50 = 0.36: not shown yet
    bad = decide(PLAN, 0, LONG, ev(200, 20), None)
    assert bad.action == "rollback" and bad.reason.startswith("error rate 10.0% of 200 with no baseline")


# ---- calibration ----------------------------------------------------------------------------------------------------
def _simulate(p_candidate: float, p_baseline: float, n: int, stages: int = 2000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    counts = {"rollback": 0, "advance": 0, "wait": 0}
    errs_c, errs_b = rng.binomial(n, p_candidate, stages), rng.binomial(n, p_baseline, stages)
    for xc, xb in zip(errs_c, errs_b):
        counts[decide(PLAN, 0, LONG, ev(n, int(xc)), ev(n, int(xb))).action] += 1
    return {k: v / stages for k, v in counts.items()}


def test_rollback_and_advance_rates_match_alpha() -> None:
    alpha = PLAN.alpha
    same = _simulate(0.05, 0.05, 200)
    assert same["rollback"] <= 1.5 * alpha
    # exactly at the margin (5% -> 7%) both one-sided tests are at their boundary: each should fire ~alpha of
    # the time (2000 stages: standard error 0.005, so [0.5, 1.5] * alpha is five standard errors either way)
    boundary = _simulate(0.07, 0.05, 200, seed=1)
    assert 0.5 * alpha <= boundary["rollback"] <= 1.5 * alpha
    assert boundary["advance"] <= 1.5 * alpha  # advancing a candidate worse by the margin
    # truly worse (5% -> 12%): the normal-approximation power is 0.72 at 300 requests and 0.90 at 500
    worse = _simulate(0.12, 0.05, 500, seed=2)
    assert worse["rollback"] >= 0.8 and worse["advance"] == 0


def test_statistics_match_published_values() -> None:
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 - 48/80, 95% interval 0.0524 to 0.3339
    lo, hi = rollout._newcombe(56, 70, 48, 80, 1.959964)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    # statpsych ci.median example: SE of the median 4.292277 (Bonett & Price)
    y = sorted([30.2, 20.4, 15.1, 10.2, 10.5, 60.8, 20.8, 25.0, 20.7, 30.9, 10.8, 5.1, 50.9, 40.0, 20.9, 10.8, 0,
                20.5, 50.8])
    assert rollout._median_se(y) == pytest.approx(4.292277, abs=1e-6)
    assert rollout._t_quantile(0.95, 10) == pytest.approx(1.812461, abs=1e-6)
    assert rollout._t_sf(2.0, 5) == pytest.approx(0.050970, abs=1e-6)
    assert rollout._binom_cdf(3, 20, 0.3) == pytest.approx(0.107087, abs=1e-6)


# ---- output and routes ----------------------------------------------------------------------------------------------
def test_to_json_is_plain_and_finite() -> None:
    d = decide(RolloutPlan(min_shadow_agreement=0.5, rollback_on_drift=True), -1, LONG, healthy(), healthy())
    out = d.to_json()
    assert set(out) == {"action", "reason", "stalled", "checks"}
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    odd = Decision("wait", "x", {"c": {"a": float("nan"), "b": float("inf"), "n": 3, "ok": True, "s": "t"}})
    assert odd.to_json()["checks"] == {"c": {"a": None, "b": None, "n": 3, "ok": True, "s": "t"}}


def test_weights_for_each_stage() -> None:
    assert weights_for(-1, PLAN, "a@v2", "a@v1") == ({"a@v1": 1.0}, 0.2)
    assert weights_for(0, PLAN, "a@v2", "a@v1") == ({"a@v2": 0.05, "a@v1": 0.95}, 0.0)
    routes, shadow = weights_for(2, PLAN, "a@v2", "a@v1")
    assert routes == {"a@v2": 0.5, "a@v1": 0.5} and shadow == 0.0
    assert weights_for(3, PLAN, "a@v2", "a@v1") == ({"a@v2": 1.0}, 0.0)
    assert weights_for(0, PLAN, "a@v1", None) == ({"a@v1": 1.0}, 0.0)
    for stage in range(len(PLAN.steps)):
        assert sum(weights_for(stage, PLAN, "a@v2", "a@v1")[0].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="candidate and baseline are the same version 'a@v1'"):
        weights_for(0, PLAN, "a@v1", "a@v1")
    with pytest.raises(ValueError, match="disabled by shadow_share=0"):
        weights_for(-1, RolloutPlan(shadow_share=0), "a@v2", "a@v1")
    with pytest.raises(ValueError, match="got 4"):
        weights_for(4, PLAN, "a@v2", "a@v1")
