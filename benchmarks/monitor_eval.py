"""Evaluation harness for monitoring: drift detection on real CLINC150 streams, noise detection per family.

Runs the same detector code the server uses (tsugiki.monitoring.drift / .noise) on features extracted by the
same engine code path (EngineCore prefill, mean-pooled last hidden state of the default model) and on each
request's noise score (the replicas' NoiseDetector with the shipped thresholds), as the monitor receives them.

    python benchmarks/monitor_eval.py                 # everything (features cached after the first run)
    python benchmarks/monitor_eval.py --seeds 20      # fewer seeds
    python benchmarks/monitor_eval.py --calibrate-noise   # also rewrite monitoring/noise_thresholds.json

Reports: run length under no drift vs the configured ERT; detection delay (median, p90) for abrupt and gradual
new-domain shifts at 10/30/100% mixture, an out-of-scope surge, and noise injection at 5/20% per family;
per-request noise AUROC and false-positive rate per family. Saves the streams' features for the Alibi Detect
baseline (benchmarks/alibi_baseline.py, run in its own virtual environment).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from tsugiki.config import default_home
from tsugiki.monitoring.corruption import corrupt
from tsugiki.monitoring.drift import DriftConfig, DriftDetector, ReferenceProfile, noise_z
from tsugiki.monitoring.noise import NoiseDetector

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
NOISE_FAMILIES = ["typos", "keyboard", "ocr", "mojibake", "random_unicode", "repeat", "code_switch", "casing"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_clinc(path: Path) -> dict[str, list[tuple[str, str]]]:
    data = json.loads((path / "data_full.json").read_text())
    return {k: [(t, i) for t, i in v] for k, v in data.items()}


def extract_features(texts: list[str], cache: Path, batch: int = 32) -> np.ndarray:
    """Prompt features exactly as the server computes them (EngineCore prefill hook), cached by content."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    f = cache / f"features-{key}.npy"
    if f.is_file():
        return np.load(f, allow_pickle=False)
    from tsugiki.config import AdapterConfig, EngineConfig, ModelConfig
    from tsugiki.serve.base_model import load_base_model, set_torch_threads
    from tsugiki.serve.engine import EngineCore, GenerationRequest
    from tsugiki.serve.sampling import SamplingParams

    log(f"torch threads: {set_torch_threads(0)}; extracting features for {len(texts)} texts (cached afterwards)")
    loaded = load_base_model(ModelConfig(), progress=True)
    core = EngineCore(loaded.model, loaded.tokenizer, engine_cfg=EngineConfig(max_batch_size=batch),
                      adapter_cfg=AdapterConfig(), store=None, max_model_len=loaded.info.max_model_len)
    out = np.zeros((len(texts), loaded.model.config.hidden_size), dtype=np.float32)
    t0 = time.time()
    for start in range(0, len(texts), batch):
        for i in range(start, min(start + batch, len(texts))):
            ids = tuple(loaded.tokenizer(texts[i])["input_ids"])

            def sink(ev, i=i):
                if getattr(ev, "features", None) is not None:
                    out[i] = ev.features

            core.add_request(GenerationRequest(str(i), ids, SamplingParams(max_tokens=1, temperature=0)), sink)
        while core.has_work():
            core.step()
        if (start // batch) % 20 == 0:
            done = min(start + batch, len(texts))
            eta = (time.time() - t0) / done * (len(texts) - done)
            log(f"  features {done}/{len(texts)}  eta {eta:.0f}s")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, out)
    return out


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def first_alarm(det: DriftDetector, x: np.ndarray, noise: np.ndarray, chunk: int = 1000,
                idx: np.ndarray | None = None) -> int | None:
    """Index of the first alarm when feature rows ``x`` with their noise scores ``noise`` (or ``x[idx]``,
    ``noise[idx]``, gathered chunk by chunk) stream through ``det`` (the server's detector code, fed in batches
    as the monitor is), or None."""
    n = len(x) if idx is None else len(idx)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk) if idx is None else idx[start:start + chunk]
        res = det.update(x[rows], noise[rows])
        if res.alarms:
            return start + res.alarms[0]
    return None


def shifted(r: np.random.Generator, p_final: float, gradual: bool, n: int,
            onset: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream plan: ``onset`` clean requests, then a mixture whose shifted share is ``p_final`` (reached
    linearly over 1000 requests when ``gradual``). Returns (shifted?, random pick) per request."""
    t = np.arange(n)
    ramp = np.minimum(1.0, (t - onset) / 1000.0) * p_final if gradual else np.full(n, p_final)
    p = np.where(t < onset, 0.0, ramp)
    return r.random(n) < p, r.integers(0, 1 << 30, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (held-out "
                                                              "checks of settings chosen on seeds 0..49)")
    ap.add_argument("--ert", type=float, default=10_000)
    ap.add_argument("--compare-ert", type=float, default=500, help="ERT of the runs compared with Alibi Detect")
    ap.add_argument("--window", type=int, default=20, help="Alibi's window size for the comparison")
    ap.add_argument("--save-seeds", type=int, default=10,
                    help="seeds whose streams are saved for the Alibi Detect baseline (~7 s each there)")
    ap.add_argument("--reference-size", type=int, default=1000)
    ap.add_argument("--onset", type=int, default=300, help="requests before the shift starts")
    ap.add_argument("--horizon", type=int, default=5000, help="requests watched after onset")
    ap.add_argument("--allowance", type=float, default=None, help="CUSUM k (default: DriftConfig's)")
    ap.add_argument("--mean-shift-rate", type=float, default=None,
                    help="DriftConfig.mean_shift_rate (0: the novelty score alone)")
    ap.add_argument("--noise-share", type=float, default=None,
                    help="DriftConfig.noise_share (0: no noise-score CUSUM, the hidden-state features alone)")
    ap.add_argument("--components", type=int, default=None)
    ap.add_argument("--neighbors", type=int, default=None)
    ap.add_argument("--skip-noise", action="store_true")
    ap.add_argument("--only-no-drift", action="store_true",
                    help="only the no-drift run lengths (the mean over seeds is heavy-tailed: ~300 seeds pin the "
                         "ERT ratio to about +-15%%)")
    ap.add_argument("--ert-over", choices=["references", "stream"], default="references",
                    help="DriftConfig.ert_over: how the CUSUM threshold is set from the ERT")
    ap.add_argument("--calibrate-noise", action="store_true")
    ap.add_argument("--out", type=Path, default=default_home() / "eval")
    args = ap.parse_args()
    over = {k: v for k, v in (("allowance", args.allowance), ("n_components", args.components),
                              ("n_neighbors", args.neighbors), ("mean_shift_rate", args.mean_shift_rate),
                              ("noise_share", args.noise_share))
            if v is not None}
    cfg = DriftConfig(ert=args.ert, reference_size=args.reference_size, ert_over=args.ert_over, **over)
    data = load_clinc(args.data)
    domains = json.loads((args.data / "domains.json").read_text())
    intent_domain = {i: d for d, its in domains.items() for i in its}

    # ---- noise detection (text only) ------------------------------------------------------------------------
    val = [t for t, _ in data["val"]]
    test = [t for t, _ in data["test"]]
    thresholds = NoiseDetector.calibrate(val, false_positive_rate=0.01)
    if args.calibrate_noise:
        target = Path(__file__).resolve().parents[1] / "monitoring" / "noise_thresholds.json"
        target.write_text(json.dumps({"source": "CLINC150 val (3000 clean queries), false_positive_rate=0.01, "
                                      "benchmarks/monitor_eval.py --calibrate-noise", "thresholds": thresholds},
                                     indent=1) + "\n")
        log(f"wrote {target}")
    det = NoiseDetector(thresholds)
    clean_scores = np.array([det.score(t).score for t in test])
    fp = float(np.mean(clean_scores >= 1.0))
    noise_rows = []
    for fam in [] if args.skip_noise else NOISE_FAMILIES + ["delete", "swap", "truncate"]:
        for sev in (0.1, 0.3, 0.5):
            reps = [det.score(corrupt(t, fam, sev, i)) for i, t in enumerate(test)]
            s = np.array([r.score for r in reps])
            noise_rows.append((fam, sev, auroc(clean_scores, s), float(np.mean(s >= 1.0))))
    print("\nnoise detection on CLINC150 test (4500 queries; thresholds calibrated on val at 1% FP)")
    print(f"false positives on clean test queries: {fp:.4f}")
    print(f"{'family':15s} {'severity':>8s} {'AUROC':>7s} {'flagged':>8s}")
    for fam, sev, a, tpr in noise_rows:
        print(f"{fam:15s} {sev:8.1f} {a:7.3f} {tpr:8.3f}")

    # ---- features ------------------------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    train = data["train"]
    train_sub = [train[i] for i in rng.choice(len(train), 6000, replace=False)]
    inscope = data["val"] + data["test"] + train_sub
    oos = data["oos_val"] + data["oos_test"] + data["oos_train"]
    texts = [t for t, _ in inscope] + [t for t, _ in oos]
    noise_base = [inscope[i] for i in rng.choice(len(inscope), 1500, replace=False)]
    noisy_texts = {fam: [corrupt(t, fam, 0.3, 1000 + j) for j, (t, _) in enumerate(noise_base)]
                   for fam in ("typos", "mojibake", "random_unicode", "code_switch")}
    all_texts = texts + [t for fam in noisy_texts for t in noisy_texts[fam]]
    feats = extract_features(all_texts, args.out)
    scores = np.array([det.score(t).text_score for t in all_texts])  # what each request's replica ships
    n_in, n_oos = len(inscope), len(oos)
    f_in, f_oos = feats[:n_in], feats[n_in:n_in + n_oos]
    s_in, s_oos = scores[:n_in], scores[n_in:n_in + n_oos]
    f_noisy, s_noisy, pos = {}, {}, n_in + n_oos
    for fam in noisy_texts:
        f_noisy[fam], s_noisy[fam] = feats[pos:pos + len(noise_base)], scores[pos:pos + len(noise_base)]
        pos += len(noise_base)
    dom = np.array([intent_domain[i] for _, i in inscope])
    noise_dom = np.array([intent_domain[i] for _, i in noise_base])
    names = sorted(domains)

    # ---- drift scenarios -------------------------------------------------------------------------------------
    n_cal = cfg.reference_size - cfg.reference_size // 2  # the neighbour half calibrates
    cfg_cmp = cfg.model_copy(update={"ert": args.compare_ert})
    scen_delays: dict[str, list[float]] = {}
    cmp_delays: dict[str, list[float]] = {}
    run_lengths, cmp_run_lengths = [], []
    saved = []
    h, h_cmp = cfg.thresholds(n_cal, cfg.reference_size), cfg_cmp.thresholds(n_cal, cfg.reference_size)
    log(f"drift: {args.seeds} seeds, ert_over={args.ert_over}, ERT {cfg.ert:g} (h={h[0]:.2f}, noise {h[1]:.2f}), "
        f"comparison ERT {args.compare_ert:g} (h={h_cmp[0]:.2f}, noise {h_cmp[1]:.2f}), k={cfg.allowance}, "
        f"mean_shift_rate={cfg.mean_shift_rate}, noise_share={cfg.noise_share}")
    t0 = time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        r = np.random.default_rng(seed)
        ref_domains = set(r.choice(names, 5, replace=False))
        in_idx = np.flatnonzero(np.isin(dom, list(ref_domains)))
        out_idx = np.flatnonzero(~np.isin(dom, list(ref_domains)))
        r.shuffle(in_idx)
        ref_idx, live_in = in_idx[: cfg.reference_size], in_idx[cfg.reference_size:]
        # the server's fit (DriftDetector.set_reference), shared by every run of this seed: a detector on it
        # starts as one right after set_reference
        prof = ReferenceProfile.fit(f_in[ref_idx], n_components=cfg.n_components, n_neighbors=cfg.n_neighbors)
        ref_noise = np.sort(s_in[ref_idx])  # the reference requests' noise scores: the noise channel's reference

        def detector(c: DriftConfig, prof: ReferenceProfile = prof, ref_noise: np.ndarray = ref_noise) -> DriftDetector:
            return DriftDetector(config=c, profile=prof, noise_reference=ref_noise)

        live, live_s = f_in[live_in], s_in[live_in]
        nd_mask = np.isin(noise_dom, list(ref_domains))
        pools = {"out": (f_in[out_idx], s_in[out_idx]), "oos": (f_oos, s_oos),
                 **{f"noisy:{fam}": (f_noisy[fam][nd_mask], s_noisy[fam][nd_mask]) for fam in f_noisy}}
        # no drift: run length until the first (false) alarm, capped at 50x ERT
        for c, lengths in ((cfg, run_lengths), (cfg_cmp, cmp_run_lengths)):
            cap = int(50 * c.ert)
            rl = first_alarm(detector(c), live, live_s, chunk=2000, idx=r.integers(0, len(live), cap))
            lengths.append(cap if rl is None else rl + 1)
        if args.only_no_drift:
            if seed % 25 == 0:
                log(f"  seed {seed - args.first_seed + 1}/{args.seeds}  {time.time() - t0:.0f}s")
            continue

        scenarios = {}
        for p in (0.1, 0.3, 1.0):
            scenarios[f"abrupt new domains {int(p * 100)}%"] = (p, False, "out")
            scenarios[f"gradual new domains {int(p * 100)}%"] = (p, True, "out")
        scenarios["oos surge 30%"] = (0.3, False, "oos")
        for fam in f_noisy:
            for p in (0.05, 0.2):
                scenarios[f"noise {fam} {int(p * 100)}%"] = (p, False, f"noisy:{fam}")
        n = args.onset + args.horizon
        seed_streams = {}
        for name, (p, gradual, kind) in scenarios.items():
            from_pool, pick = shifted(r, p, gradual, n, args.onset)
            pool, pool_s = pools[kind]
            xs = np.where(from_pool[:, None], pool[pick % len(pool)], live[pick % len(live)])
            ss = np.where(from_pool, pool_s[pick % len(pool)], live_s[pick % len(live)])
            first = first_alarm(detector(cfg), xs, ss)
            if first is not None and first < args.onset:
                scen_delays.setdefault(name, []).append(np.nan)  # a false alarm before onset
            else:
                scen_delays.setdefault(name, []).append(np.inf if first is None else first - args.onset + 1)
            # For the comparison with Alibi Detect both detectors start at the change (as Alibi's own examples
            # measure delay), so delays are not confounded by false alarms before it.
            post = first_alarm(detector(cfg_cmp), xs[args.onset:args.onset + 2000], ss[args.onset:args.onset + 2000])
            cmp_delays.setdefault(name, []).append(np.inf if post is None else post + 1)
            if seed - args.first_seed < args.save_seeds:
                seed_streams[name] = (from_pool, pick, kind)
        if seed - args.first_seed < args.save_seeds:
            saved.append({"seed": seed, "ref_idx": ref_idx, "live_in": live_in, "out_idx": out_idx,
                          "nd_mask": nd_mask, "streams": seed_streams, "prof": prof, "ref_noise": ref_noise})
        if seed % 5 == 0:
            log(f"  seed {seed - args.first_seed + 1}/{args.seeds}  {time.time() - t0:.0f}s")

    def fmt(v: list[float]) -> tuple[str, str, str]:
        a = np.array(v, dtype=float)
        det_share = np.mean(np.isfinite(a))
        finite = a[np.isfinite(a)]
        med = f"{np.median(a[~np.isnan(a)]):.0f}" if np.isfinite(np.median(a[~np.isnan(a)])) else "miss"
        p90 = np.quantile(a[~np.isnan(a)], 0.9)
        return med, (f"{p90:.0f}" if np.isfinite(p90) else "miss"), f"{det_share:.2f}" if len(finite) else "0.00"

    print(f"\ndrift detection on CLINC150 streams ({args.seeds} seeds; reference {cfg.reference_size} requests from 5 "
          f"random domains; onset after {args.onset} requests; horizon {args.horizon})")
    print(f"no drift, ERT {cfg.ert:g}: mean run length {np.mean(run_lengths):.0f} "
          f"(ratio {np.mean(run_lengths) / cfg.ert:.2f}; runs capped at {50 * cfg.ert:g}; "
          f"median {np.median(run_lengths):.0f})")
    print(f"no drift, ERT {args.compare_ert:g}: mean run length {np.mean(cmp_run_lengths):.0f} "
          f"(ratio {np.mean(cmp_run_lengths) / args.compare_ert:.2f})")
    print(f"delay = requests after onset until the alarm; 'found' = share of seeds detecting within {args.horizon} "
          f"(ERT {cfg.ert:g}, detector running since before onset; a false alarm before onset counts as not "
          f"found) or within 2000 (ERT {args.compare_ert:g}, detector started at the change)")
    print(f"{'scenario':32s} {'ERT ' + format(cfg.ert, 'g') + ' med':>14s} {'p90':>6s} {'found':>6s}   "
          f"{'ERT ' + format(args.compare_ert, 'g') + ' med':>12s} {'p90':>6s} {'found':>6s}")
    for name in scen_delays:
        a, b = fmt(scen_delays[name]), fmt(cmp_delays[name])
        print(f"{name:32s} {a[0]:>14s} {a[1]:>6s} {a[2]:>6s}   {b[0]:>12s} {b[1]:>6s} {b[2]:>6s}")

    # ---- streams for the Alibi Detect baseline ---------------------------------------------------------------
    args.out.mkdir(parents=True, exist_ok=True)
    bundle: dict[str, np.ndarray] = {}
    manifest = {"compare_ert": args.compare_ert, "window": args.window, "onset": args.onset,
                "horizon": args.horizon, "seeds": [], "ours": {}}
    for s in saved:
        seed = s["seed"]
        prof = s["prof"]

        def proj(x: np.ndarray, prof: ReferenceProfile = prof) -> np.ndarray:
            return ((x - prof.mean) @ prof.components).astype(np.float32)

        # the noise channel's score as a feature column (``--noise-column`` there): Phi^-1 of the request's
        # noise-score rank among the reference's, as the detector computes it
        zrng = np.random.default_rng(10**6 + seed)

        def nz(x: np.ndarray, ref: np.ndarray = s["ref_noise"], zrng: np.random.Generator = zrng) -> np.ndarray:
            return noise_z(ref, x, zrng).astype(np.float32)

        bundle[f"s{seed}_ref"] = proj(f_in[s["ref_idx"]])
        bundle[f"s{seed}_ref_noise_z"] = nz(s_in[s["ref_idx"]])
        # the half the whitening was not fitted on: exchangeable with live traffic under no drift
        bundle[f"s{seed}_ref_heldout"] = prof.points.astype(np.float32)
        bundle[f"s{seed}_ref_heldout_noise_z"] = nz(s_in[s["ref_idx"][ReferenceProfile.split(len(s["ref_idx"]))[1]]])
        for name, (from_pool, pick, kind) in s["streams"].items():
            live, live_s = f_in[s["live_in"]], s_in[s["live_in"]]
            pool, pool_s = {"out": (f_in[s["out_idx"]], s_in[s["out_idx"]]), "oos": (f_oos, s_oos)}.get(
                kind, (None, None))
            if pool is None or pool_s is None:
                fam = kind.split(":")[1]
                pool, pool_s = f_noisy[fam][s["nd_mask"]], s_noisy[fam][s["nd_mask"]]
            x = np.where(from_pool[:, None], pool[pick % len(pool)], live[pick % len(live)])
            xs = np.where(from_pool, pool_s[pick % len(pool)], live_s[pick % len(live)])
            bundle[f"s{seed}_{name}"] = proj(x[args.onset:args.onset + 2000])
            bundle[f"s{seed}_{name}_noise_z"] = nz(xs[args.onset:args.onset + 2000])
        nd_idx = np.random.default_rng(seed).integers(0, len(s["live_in"]), int(10 * args.compare_ert))
        bundle[f"s{seed}_nodrift"] = proj(f_in[s["live_in"]][nd_idx])
        bundle[f"s{seed}_nodrift_noise_z"] = nz(s_in[s["live_in"]][nd_idx])
        manifest["seeds"].append(seed)
    manifest["scenarios"] = list(saved[0]["streams"]) if saved else []
    manifest["ours"] = {name: cmp_delays[name][:len(saved)] for name in manifest["scenarios"]}
    manifest["ours_no_drift_run_length"] = cmp_run_lengths[:len(saved)]
    if saved:  # no seeds saved (--save-seeds 0, --only-no-drift): keep the streams a previous run saved
        np.savez_compressed(args.out / "alibi_streams.npz", **bundle)
        (args.out / "alibi_manifest.json").write_text(json.dumps(manifest, default=float))
        log(f"saved streams for the Alibi Detect baseline to {args.out}")
    print("RESULT_JSON " + json.dumps({
        "noise_fp_clean": fp, "noise": noise_rows, "ert": cfg.ert, "mean_run_length": float(np.mean(run_lengths)),
        "compare_ert": args.compare_ert, "compare_mean_run_length": float(np.mean(cmp_run_lengths)),
        "delays": {k2: [float(x) for x in v] for k2, v in scen_delays.items()},
        "compare_delays": {k2: [float(x) for x in v] for k2, v in cmp_delays.items()}}))


if __name__ == "__main__":
    main()
