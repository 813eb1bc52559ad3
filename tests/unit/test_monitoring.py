"""Monitoring: corruption families, the noise detector, the drift detector's calibration, the monitor's state."""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tsugiki.monitoring.corruption import FAMILIES, corrupt
from tsugiki.monitoring.drift import (
    SHIFT_TAIL_CAP,
    DriftConfig,
    DriftDetector,
    ReferenceProfile,
    cusum_arl,
    cusum_threshold,
    noise_z,
)
from tsugiki.monitoring.monitor import FeatureShipper, Monitor, MonitorConfig, Observation
from tsugiki.monitoring.noise import REASONS, NoiseDetector

CLEAN = ["how do i say thank you in french", "what is my checking account balance",
         "set an alarm for seven in the morning", "book a table for two at an italian restaurant",
         "how long does it take to get a new credit card", "please tell me the weather in boston tomorrow"]


def test_corruption_is_deterministic_and_changes_text() -> None:
    for fam in FAMILIES:
        a = corrupt(CLEAN[0], fam, 0.5, 3)
        assert a == corrupt(CLEAN[0], fam, 0.5, 3)
        assert a != CLEAN[0], fam
    assert corrupt(CLEAN[0], "typos", 0.5, 1) != corrupt(CLEAN[0], "typos", 0.5, 2)
    with pytest.raises(ValueError, match="unknown corruption family 'nope'"):
        corrupt("x", "nope", 0.5, 0)
    with pytest.raises(ValueError, match="severity should be in"):
        corrupt("x", "typos", 0.0, 0)


@pytest.mark.parametrize("text, reason", [
    ("how do i sya thnak yuo in frnech pleaes", "typo_heavy"),
    ("what is my chÃ©cking accÃ¶unt balance â€” please", "encoding_garbage"),
    ("set an ☃☄★ alarm ∰∱∲ for ∳⊕⊗ seven", "random_characters"),
    ("bооk а tаblе fоr twо", "mixed_script"),  # Cyrillic homoglyphs inside Latin words
    ("pleeeeeeease helllllllp meeeeee", "repetition"),
    ("how long does it take to get a new cre", "truncated"),
])
def test_each_reason_fires_on_its_noise(text: str, reason: str) -> None:
    # The shipped CLINC150 calibration switches `truncated` off (assistant queries often end in names and
    # slang that look cut), so it is tested at a threshold of 1.0.
    report = NoiseDetector({"truncated": 1.0} if reason == "truncated" else None).score(text)
    assert reason in report.reasons and report.score >= 1.0, report


def test_clean_text_is_not_flagged_and_over_length_uses_tokens() -> None:
    det = NoiseDetector(max_prompt_tokens=100)
    for t in CLEAN:
        assert not det.score(t, prompt_tokens=12).flagged, t
    assert det.score(CLEAN[0], prompt_tokens=150).reasons == ("over_length",)
    with pytest.raises(ValueError, match="unknown noise reasons"):
        NoiseDetector({"bogus": 1.0})


def test_a_very_long_word_skips_the_typo_edit_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit search costs ~54 candidates per letter, each as long as the word: a 7,600-letter word (under the
    token limit) would hold the request for seconds. No dictionary word is that long: it scores as unknown."""
    from tsugiki.monitoring import noise

    searched: list[int] = []
    real = noise._edits1
    monkeypatch.setattr(noise, "_edits1", lambda w: searched.append(len(w)) or real(w))
    noise._typo_likeness.cache_clear()
    report = NoiseDetector().score("please book " + "a" * 7600 + " now", prompt_tokens=1900)
    assert report.flagged and max(searched, default=0) <= noise._MAX_TYPO_WORD
    assert noise._typo_likeness("q" * 40) == 0.6 and noise._typo_likeness("the" * 11) == 0.6
    noise._typo_likeness.cache_clear()


def test_calibration_caps_false_positives() -> None:
    rng = random.Random(0)
    words = " ".join(CLEAN).split()
    clean = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    thresholds = NoiseDetector.calibrate(clean, false_positive_rate=0.05)
    assert set(thresholds) == set(REASONS)
    det = NoiseDetector(thresholds)
    assert np.mean([det.score(t).flagged for t in clean]) <= 0.05


@pytest.mark.parametrize("variance", [1.0, 1.3])
def test_cusum_threshold_gives_the_configured_run_length(variance: float) -> None:
    # Monte Carlo on N(0, variance) increments: the mean run length must match the ERT within sampling error.
    rng = np.random.default_rng(0)
    k, ert = 0.25, 300
    h = cusum_threshold(k, ert, variance=variance)
    if variance > 1:
        assert h > cusum_threshold(k, ert)
    runs = []
    for _ in range(300):
        s, t = 0.0, 0
        while True:
            t += 1
            s = max(0.0, s + np.sqrt(variance) * rng.standard_normal() - k)
            if s > h:
                break
        runs.append(t)
    # the run length is roughly exponential: its mean over 300 runs has a relative sd of ~6%
    assert 0.8 * ert < np.mean(runs) < 1.2 * ert


def _gauss(rng: np.random.Generator, n: int, shift: float = 0.0, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d))
    x[:, 0] += shift
    return x


def test_detector_calibration_no_drift_and_detection_under_shift() -> None:
    cfg = DriftConfig(ert=200, reference_size=400, n_components=8, n_neighbors=10)
    rng = np.random.default_rng(1)
    lengths = []
    for seed in range(20):
        r = np.random.default_rng(seed)
        det = DriftDetector(config=cfg)
        det.set_reference(_gauss(r, cfg.reference_size))
        seen = 0
        while True:
            res = det.update(_gauss(r, 50))
            if res.alarms:
                lengths.append(seen + res.alarms[0] + 1)
                break
            seen += 50
            if seen > 20 * cfg.ert:
                lengths.append(seen)
                break
    # alibi-style check: measured average run length within a factor of the configured ERT
    assert cfg.ert / 2 < np.mean(lengths) < cfg.ert * 2, lengths
    det = DriftDetector(config=cfg)
    det.set_reference(_gauss(rng, cfg.reference_size))
    res = det.update(_gauss(rng, 200, shift=4.0))
    assert res.alarms and res.alarms[0] < 50


def _noise_scores(rng: np.random.Generator, n: int, noisy: float = 0.0) -> np.ndarray:
    """Clean traffic's noise scores as measured on CLINC150 (most exactly 0, a tail), with a share ``noisy`` of
    typo-ridden requests (scores around 0.5-1.5)."""
    s = np.where(rng.random(n) < 0.63, 0.0, rng.exponential(0.25, n))
    hit = rng.random(n) < noisy
    s[hit] = rng.uniform(0.5, 1.5, int(hit.sum()))
    return s


def test_noise_channel_ranks_are_exactly_calibrated_despite_ties_and_its_run_length_holds() -> None:
    r = np.random.default_rng(0)
    ref = np.sort(_noise_scores(r, 1000))
    z = noise_z(ref, _noise_scores(r, 20_000), r)
    # randomised ranks: N(0, 1) although 63% of the scores tie at 0 (mid-ranks would put them all at -0.5)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05 and abs(np.mean(z > 1.645) - 0.05) < 0.01
    # the noise CUSUM's building block: its threshold for an ERT of 2000, averaged over 400-score references
    h, k = cusum_threshold(DriftConfig().noise_allowance, 2000, 400), DriftConfig().noise_allowance
    lengths = []
    for seed in range(300):
        rs = np.random.default_rng(seed)
        ref = np.sort(_noise_scores(rs, 400))  # a fresh reference each time: 'references' averages over them
        zs, s, t = noise_z(ref, _noise_scores(rs, 40_000), rs), 0.0, 0
        while t < len(zs):
            s = max(0.0, s + zs[t] - k)
            t += 1
            if s > h:
                break
        lengths.append(t)
    # 300 runs: the mean's standard error is ~6% of it
    assert 0.8 * 2000 < np.mean(lengths) < 1.25 * 2000, np.mean(lengths)


def test_dense_noise_raises_the_noise_channel_and_its_reference_comes_from_first_requests(tmp_path: Path) -> None:
    cfg = DriftConfig(ert=500, reference_size=200, n_components=8)
    r = np.random.default_rng(11)
    det = DriftDetector(config=cfg)
    det.set_reference(_gauss(r, 200), _noise_scores(r, 200))
    assert det.noise_ready
    quiet = det.update(_gauss(r, 300), _noise_scores(r, 300))
    assert not quiet.alarms and np.isfinite(quiet.z_noise).all()
    res = det.update(_gauss(r, 300), _noise_scores(r, 300, noisy=0.3))  # features unchanged, 30% typo-ridden
    assert res.alarms and res.channels[0] == "noise" and res.alarms[0] < 100, (res.alarms, res.channels)
    off = DriftDetector(config=cfg.model_copy(update={"noise_share": 0.0}), profile=det.profile)
    assert not off.update(_gauss(r, 300), _noise_scores(r, 300, noisy=0.3)).alarms
    # no noise scores with the reference: the first requests that carry one become it; unscored rows (NaN) and
    # rows without any noise argument skip the noise channel and still feed the feature CUSUM
    late = DriftDetector(config=cfg)
    late.set_reference(_gauss(r, 200))
    # until a noise CUSUM runs, the feature CUSUM has the whole false-alarm budget
    alone = DriftConfig(ert=500, noise_share=0).thresholds(100, 200)
    assert not late.noise_ready and late.threshold == alone[0] and late.noise_threshold == math.inf
    scores = _noise_scores(r, 150)
    scores[::10] = np.nan
    res = late.update(_gauss(r, 150), scores)
    assert len(res.z) == 150 and np.isnan(res.z_noise).all() and not late.noise_ready
    late.update(_gauss(r, 50))
    res = late.update(_gauss(r, 100), _noise_scores(r, 100))
    assert late.noise_ready and len(late.noise_reference) == 200 and np.isfinite(res.z_noise[-35:]).all()
    assert late.threshold > alone[0] and math.isfinite(late.noise_threshold)
    assert np.isnan(res.z_noise[:65]).all()  # 135 scored rows before: 65 more completed the reference
    with pytest.raises(ValueError, match="noise scores for"):
        late.update(_gauss(r, 3), np.zeros(2))
    # state round trip, noise CUSUM included; a state saved before the noise channel collects its reference
    late.update(_gauss(r, 20), _noise_scores(r, 20, noisy=0.5))
    scalars, arrays = late.state_dict()
    back = DriftDetector.from_state(scalars, arrays)
    assert back.noise_statistic == late.noise_statistic > 0 and np.array_equal(back.noise_reference,
                                                                              late.noise_reference)
    probe, noise = _gauss(r, 30), _noise_scores(r, 30)
    a, b = late.update(probe, noise), back.update(probe, noise)
    assert np.allclose(a.z_noise, b.z_noise) and late.noise_statistic == back.noise_statistic
    del arrays["noise_reference"], scalars["noise_statistic"]
    old = DriftDetector.from_state(scalars, arrays)
    assert not old.noise_ready and old.noise_statistic == 0.0
    # state saved while collecting, loaded under a smaller reference_size: what was collected is the reference
    collecting = DriftDetector(config=cfg)
    collecting.update(_gauss(r, 150), _noise_scores(r, 150))
    scalars, arrays = collecting.state_dict()
    smaller = DriftDetector.from_state(scalars, arrays, config=cfg.model_copy(update={"reference_size": 100}))
    res = smaller.update(_gauss(r, 10), _noise_scores(r, 10))
    assert smaller.ready and smaller.noise_ready and res.offset == 0 and len(res.z) == 10
    assert len(smaller.noise_reference) == 150 and np.isfinite(res.z_noise).all()


def test_mean_shift_score_is_calibrated_and_sees_traffic_moving_together() -> None:
    # Every request moves a little in one common direction (|shift| = 0.8 sd over 4 of 16 dimensions): each still
    # looks ordinary (novelty ~0), which the novelty CUSUM alone is slow to see; the mean-shift score sees it.
    def rows(r: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
        x = r.standard_normal((n, 16))
        x[:, :4] += shift / 2
        return x

    cfg = DriftConfig(ert=1000, reference_size=400, n_components=16, n_neighbors=10)
    for seed in range(3):
        r = np.random.default_rng(seed)
        det = DriftDetector(config=cfg)
        det.set_reference(rows(r, 400))
        assert det.profile is not None
        null, _ = det.profile.shift_z(det.profile.project(rows(r, 4000)), np.zeros(16), cfg.mean_shift_rate)
        # ~N(0, 1) with no drift: the calibration set's own finite-sample wobble is ~1/sqrt(200) = 0.07
        assert abs(null.mean()) < 0.15 and 0.9 < null.std() < 1.1, (null.mean(), null.std())
        moved = det.profile.project(rows(r, 1000, shift=0.8))
        z_shift, live_mean = det.profile.shift_z(moved, np.zeros(16), cfg.mean_shift_rate)
        assert z_shift[100:].mean() > 0.4 and det.profile.novelty_z(moved).mean() < 0.3
        assert np.linalg.norm(live_mean) > 0.5  # the running mean moved off the reference's centre
        # far beyond every calibration point the rank saturates (~3.1); the score goes on, up to the cap
        far, _ = det.profile.shift_z(det.profile.project(rows(r, 200, shift=8.0)), np.zeros(16), cfg.mean_shift_rate)
        assert far[50:].min() > 3.5 and far.max() == SHIFT_TAIL_CAP
        x = rows(r, 1000, shift=0.8)
        on, off = DriftDetector(config=cfg), DriftDetector(config=cfg.model_copy(update={"mean_shift_rate": 0}))
        ref = rows(np.random.default_rng(100 + seed), 400)
        on.set_reference(ref)
        off.set_reference(ref)
        first_on, first_off = on.update(x).alarms, off.update(x).alarms
        assert first_on and first_on[0] < 100 and (not first_off or first_off[0] > first_on[0]), (first_on, first_off)


def test_mean_shift_rate_settings_and_state_saved_before_it() -> None:
    assert DriftConfig(mean_shift_rate=0, noise_share=0).thresholds(500, 1000) == (
        pytest.approx(cusum_threshold(0.15, 10_000, 500)), math.inf)
    # the noise CUSUM takes its share of the false-alarm budget; the feature CUSUM runs at the rest, exactly so
    # for one reference ('stream')
    stream = DriftConfig(mean_shift_rate=0, ert_over="stream")
    assert stream.thresholds(500, 1000) == (pytest.approx(cusum_threshold(0.15, 10_000 / 0.9)),
                                            pytest.approx(cusum_threshold(0.3, 100_000)))
    # averaged over references both ERTs grow by one factor until the union's averaged run length is the ERT
    cfg = DriftConfig(mean_shift_rate=0)
    h, h_noise = cfg.thresholds(500, 1000)
    plain = cusum_threshold(0.15, 10_000 / 0.9, 500), cusum_threshold(0.3, 100_000, 1000)
    assert h > plain[0] and h_noise > plain[1]
    nodes, w = np.polynomial.hermite_e.hermegauss(40)
    w = w / w.sum()
    a = np.array([cusum_arl(0.15, h, x / math.sqrt(500)) for x in nodes])
    b = np.array([cusum_arl(0.3, h_noise, x / math.sqrt(1000)) for x in nodes])
    assert (w[:, None] * w[None, :] / (1 / a[:, None] + 1 / b[None, :])).sum() == pytest.approx(10_000, rel=1e-3)
    # by one factor: each CUSUM's own averaged run length is its share's ERT times the same factor (> 1)
    nodes60, w60 = np.polynomial.hermite_e.hermegauss(60)
    w60 = w60 / w60.sum()
    own_a = sum(wi * cusum_arl(0.15, h, x / math.sqrt(500)) for x, wi in zip(nodes60, w60)) / (10_000 / 0.9)
    own_b = sum(wi * cusum_arl(0.3, h_noise, x / math.sqrt(1000)) for x, wi in zip(nodes60, w60)) / (10_000 / 0.1)
    assert own_a == pytest.approx(own_b, rel=1e-3) and 1.05 < own_a < 2
    for bad in (0.001, 0.6, -0.1):
        with pytest.raises(ValueError):
            DriftConfig(mean_shift_rate=bad)
    # calibration points that all project alike (a degenerate reference): no division by their zero spread
    flat = ReferenceProfile(mean=np.zeros(3), components=np.eye(3), points=np.zeros((10, 3)),
                            calibration=np.zeros(10), n_neighbors=1)
    z, _ = flat.shift_z(np.ones((5, 3)), np.zeros(3), 0.5)
    assert np.isfinite(z).all() and z[0] == 0.0 and z[1] > 1.0
    det = DriftDetector(config=DriftConfig(ert=500, reference_size=100, n_components=4))
    det.set_reference(_gauss(np.random.default_rng(5), 100, d=6))
    det.update(_gauss(np.random.default_rng(7), 20, d=6))
    scalars, arrays = det.state_dict()
    del arrays["live_mean"]  # state written before the mean-shift score existed
    old = DriftDetector.from_state(scalars, arrays)
    probe = _gauss(np.random.default_rng(6), 30, d=6)
    # it scores as a detector right after set_reference does: its running mean starts at zero
    assert np.allclose(old.update(probe).z, DriftDetector(config=det.config, profile=det.profile).update(probe).z)
    assert old.live_mean is not None and old.live_mean.any()


def test_reference_collected_from_first_requests_and_state_round_trip(tmp_path: Path) -> None:
    cfg = DriftConfig(ert=500, reference_size=100, n_components=4)
    rng = np.random.default_rng(2)
    det = DriftDetector(config=cfg)
    res = det.update(_gauss(rng, 60, d=6))
    assert not det.ready and res.offset == 60
    res = det.update(_gauss(rng, 60, d=6))
    assert det.ready and res.offset == 40 and len(res.z) == 20
    scalars, arrays = det.state_dict()
    np.savez(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        back = DriftDetector.from_state(scalars, {k: z[k] for k in z.files})
    probe = _gauss(rng, 30, shift=1.0, d=6)
    a, b = det.update(probe), back.update(probe)
    assert np.allclose(a.z, b.z) and det.statistic == back.statistic and a.alarms == b.alarms
    with pytest.raises(ValueError, match="at least"):
        ReferenceProfile.fit(np.zeros((5, 3)))


def _obs(adapter: str, x: np.ndarray, start: int = 0) -> list[Observation]:
    return [Observation(adapter=adapter, request_id=f"r{start + i}", time=0.0, features=row, output_logprob=-1.0)
            for i, row in enumerate(x)]


def test_monitor_alarms_events_and_survives_restart(tmp_path: Path) -> None:
    cfg = MonitorConfig(state_dir=tmp_path, drift=DriftConfig(ert=1000, reference_size=200, n_components=8),
                        save_interval_s=0)
    rng = np.random.default_rng(3)
    mon = Monitor(cfg)
    assert mon.observe(_obs("intent", _gauss(rng, 200))) == 0
    assert mon.status("intent")["state"] == "monitoring"
    assert mon.observe(_obs("intent", _gauss(rng, 100), 200)) == 0
    assert mon.observe(_obs("base", _gauss(rng, 50))) == 0  # another adapter collects its own reference
    fired = mon.observe(_obs("intent", _gauss(rng, 300, shift=3.0), 300))
    assert fired >= 1
    ev = mon.events("intent")[0]
    # the default threshold, from the 100 calibration points of a 200-request reference (DriftConfig.threshold)
    assert ev["adapter"] == "intent" and ev["threshold"] == pytest.approx(
        cusum_threshold(0.15, 1000, 200, 1 + 2 / 5))  # no noise scores came: the feature CUSUM has the whole budget
    assert len(ev["example_request_ids"]) == 5 and ev["window"]["mean_z"] > 0.2  # ~0 with no drift
    assert mon.registry.get_sample_value("tsugiki_drift_alarm", {"adapter": "intent"}) == 1.0
    assert mon.registry.get_sample_value("tsugiki_drift_alarms_total", {"adapter": "intent"}) == fired
    stat = mon.status("intent")["statistic"]
    # a new monitor on the same state directory resumes: same reference, statistic, alarm flag and events
    again = Monitor(cfg)
    st = again.status("intent")
    assert st["alarm"] and st["statistic"] == pytest.approx(stat) and again.events("intent")[0]["id"] == ev["id"]
    assert again.status("base")["reference_collected"] == 50
    probe = _gauss(rng, 20)
    mon.observe(_obs("intent", probe))
    again.observe(_obs("intent", probe))
    assert again.status("intent")["statistic"] == pytest.approx(mon.status("intent")["statistic"])
    again.reset("intent")
    assert again.registry.get_sample_value("tsugiki_drift_alarm", {"adapter": "intent"}) == 0.0
    # acknowledging a name the monitor never saw creates nothing: no metric series, no state directory
    assert again.reset("..")["state"] == again.reset("made-up")["state"] == "no traffic yet"
    assert again.adapters() == ["base", "intent"] and not (tmp_path / "made-up").exists()
    assert again.registry.get_sample_value("tsugiki_drift_threshold", {"adapter": "made-up"}) is None
    # settings changed since the state was saved apply on restart (the saved profile is kept)
    quieter = Monitor(cfg.model_copy(update={"drift": cfg.drift.model_copy(update={"ert": 5000,
                                                                                    "mean_shift_rate": 0.0})}))
    st = quieter.status("intent")
    assert st["config"]["ert"] == 5000 and st["config"]["mean_shift_rate"] == 0.0 and st["state"] == "monitoring"
    assert st["threshold"] == pytest.approx(cusum_threshold(0.15, 5000, 100))  # novelty alone: n,
    # variance 1 (and no noise CUSUM: these requests had no noise scores)
    # saved settings this version refuses (an older release allowed mean_shift_rate up to 1) or no longer has do not
    # stop the monitor starting: the state loads under today's settings; a state missing its arrays is skipped
    import json

    saved = json.loads((tmp_path / "intent" / "state.json").read_text())
    saved["config"].update(mean_shift_rate=0.6, retired_setting=1)
    (tmp_path / "intent" / "state.json").write_text(json.dumps(saved))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text(json.dumps({"config": {}}))
    np.savez(tmp_path / "broken" / "arrays.npz", points=np.zeros((3, 2)))
    upgraded = Monitor(cfg)
    assert upgraded.status("intent")["config"]["mean_shift_rate"] == cfg.drift.mean_shift_rate
    assert upgraded.status("intent")["alarm"] is False and "broken" not in upgraded.adapters()


def test_shipper_batches_and_never_raises_when_the_monitor_is_down() -> None:
    from prometheus_client import CollectorRegistry

    from tsugiki.monitoring.metrics import RequestQualityMetrics

    got: list[int] = []
    metrics = RequestQualityMetrics(CollectorRegistry())

    async def ok(batch: list) -> None:
        got.append(len(batch))

    async def down(batch: list) -> None:
        raise ConnectionError("monitor is gone")

    async def run(sink) -> None:
        shipper = FeatureShipper(sink, metrics, batch_size=10, interval_s=0.05)
        for i in range(25):
            shipper.add(Observation(adapter="a", request_id=str(i), time=0.0, features=np.zeros(3)))
        await shipper.flush()

    asyncio.run(run(ok))
    assert sum(got) == 25
    asyncio.run(run(down))
    assert metrics.dropped._value.get() == 25


def test_per_adapter_settings_override_defaults(tmp_path: Path) -> None:
    cfg = MonitorConfig(state_dir=tmp_path, drift=DriftConfig(reference_size=50),
                        adapters={"quiet": DriftConfig(enabled=False),
                                  "strict": DriftConfig(ert=100, reference_size=60)})
    mon = Monitor(cfg)
    rng = np.random.default_rng(4)
    mon.observe(_obs("quiet", _gauss(rng, 80)) + _obs("strict", _gauss(rng, 80)) + _obs("other", _gauss(rng, 80)))
    assert mon.status("quiet")["state"] == "no traffic yet"
    assert mon.status("strict")["config"]["ert"] == 100 and mon.status("strict")["requests_seen"] == 20
    assert mon.status("other")["requests_seen"] == 30


def test_monitor_raises_a_noise_alarm_with_its_own_event_and_metrics(tmp_path: Path) -> None:
    mon = Monitor(MonitorConfig(state_dir=tmp_path, drift=DriftConfig(ert=500, reference_size=200, n_components=8),
                                save_interval_s=0))
    r = np.random.default_rng(12)

    def obs(x: np.ndarray, noise: np.ndarray, start: int) -> list[Observation]:
        return [Observation(adapter="intent", request_id=f"r{start + i}", time=0.0, features=row,
                            noise_score=float(s)) for i, (row, s) in enumerate(zip(x, noise))]

    mon.set_reference("intent", _gauss(r, 200), "tuning data", noise=_noise_scores(r, 200))
    assert mon.status("intent")["noise_reference"] == "ready"
    assert mon.observe(obs(_gauss(r, 200), _noise_scores(r, 200), 0)) == 0
    assert mon.observe(obs(_gauss(r, 200), _noise_scores(r, 200, noisy=0.3), 200)) >= 1
    ev = mon.events("intent")[0]
    assert ev["statistic"] == "cusum_noise_score_rank" and ev["threshold"] == pytest.approx(
        DriftConfig(ert=500).thresholds(100, 200)[1])
    assert ev["window"]["mean_noise_z"] > 0.2 and len(ev["example_request_ids"]) == 5
    assert mon.registry.get_sample_value("tsugiki_drift_noise_threshold", {"adapter": "intent"}) == ev["threshold"]
    assert mon.registry.get_sample_value("tsugiki_drift_noise_score", {"adapter": "intent"}) is not None
    # unscored requests (no user text) skip the noise channel; acknowledging restarts both CUSUMs
    mon.observe([Observation(adapter="intent", request_id="x", time=0.0, features=_gauss(r, 1)[0])])
    assert mon.reset("intent")["noise_statistic"] == 0.0
    # with the noise CUSUM off its threshold is infinite: the status stays valid JSON (the API refuses NaN and inf)
    import json

    off = Monitor(MonitorConfig(state_dir=tmp_path / "off", drift=DriftConfig(noise_share=0, reference_size=50)))
    off.observe(obs(_gauss(r, 60), _noise_scores(r, 60), 0))
    st = off.status("intent")
    assert st["noise_threshold"] is None and st["noise_reference"] == "off"
    json.dumps(st, allow_nan=False)
