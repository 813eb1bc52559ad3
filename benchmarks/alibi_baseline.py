"""Alibi Detect's MMDDriftOnline on the exact streams benchmarks/monitor_eval.py saved, at the same ERT.

Alibi Detect is a benchmark-only baseline, never a dependency (it pins numpy<2 and transformers<5, and is
under the Business Source License): run it in a virtual environment of its own:

    python3 -m venv /tmp/alibi-venv
    /tmp/alibi-venv/bin/pip install torch==2.13.0 "alibi-detect[torch]==0.13.*"
    /tmp/alibi-venv/bin/python benchmarks/alibi_baseline.py ~/.cache/tsugiki/eval

Alibi sees the features tsugiki's feature CUSUM sees: the reference's PCA-whitened projection (64 dims) of the
mean-pooled hidden states. tsugiki's detector also runs a CUSUM on the requests' noise scores (text statistics);
``--noise-column`` gives Alibi that signal too, as a 65th column: the same ``Phi^-1`` of the noise-score rank
among the reference's, on the same unit scale as the whitened dimensions. Prints detection delays (median,
p90, share detected) per scenario beside tsugiki's.

``--reference held-out`` gives Alibi only the 500 reference points the whitening was not fitted on, as tsugiki
scores against. With all 1000 (the default), half of Alibi's reference is in-sample for the whitening, whose
coordinates are spread wider than fresh traffic's along the top components; fresh traffic then differs from the
reference with no drift at all, and Alibi alarms more often than its ERT says.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def first_alarm(cd: Any, x: np.ndarray) -> float:
    """1-based index of the first drift alarm of a freshly reset detector on ``x`` (inf if none)."""
    cd.reset_state()
    for t in range(len(x)):
        if cd.predict(x[t], return_test_stat=False)["data"]["is_drift"]:
            return t + 1
    return np.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=Path.home() / ".cache" / "tsugiki" / "eval")
    ap.add_argument("n_boot", nargs="?", type=int, default=0, help="bootstrap simulations (default 10x ERT)")
    ap.add_argument("--reference", choices=["all", "held-out"], default="all",
                    help="x_ref: all 1000 reference points, or only the 500 the whitening was not fitted on")
    ap.add_argument("--match", default=None, metavar="REGEX",
                    help="only the scenarios whose name matches (re.search), e.g. '5%%$' for the 5%% noise streams")
    ap.add_argument("--noise-column", action="store_true",
                    help="append each request's noise-score rank (as tsugiki's noise CUSUM scores it) as a column")
    args = ap.parse_args()
    out, n_boot = args.out.expanduser(), args.n_boot
    manifest = json.loads((out / "alibi_manifest.json").read_text())
    streams = np.load(out / "alibi_streams.npz", allow_pickle=False)
    from alibi_detect.cd import MMDDriftOnline

    def load(key: str) -> np.ndarray:
        if key not in streams.files:
            raise SystemExit(f"{out / 'alibi_streams.npz'} has no {key}: save the streams again with this "
                             "version of benchmarks/monitor_eval.py")
        x = streams[key]
        return np.concatenate([x, streams[f"{key}_noise_z"][:, None]], axis=1) if args.noise_column else x

    ert, window = manifest["compare_ert"], manifest["window"]
    scenarios = [n for n in manifest["scenarios"] if args.match is None or re.search(args.match, n)]
    n_boot = n_boot or int(10 * ert)
    delays: dict[str, list[float]] = {}
    run_lengths: list[float] = []
    for seed in manifest["seeds"]:
        t0 = time.time()
        x_ref = load(f"s{seed}_ref" if args.reference == "all" else f"s{seed}_ref_heldout")
        cd = MMDDriftOnline(x_ref, ert=ert, window_size=window, backend="pytorch", n_bootstraps=n_boot,
                            verbose=False)
        print(f"[seed {seed}] calibrated in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        nd = load(f"s{seed}_nodrift")
        rl = first_alarm(cd, nd)
        run_lengths.append(rl if np.isfinite(rl) else len(nd))
        for name in scenarios:
            # streams start at the change: the delay is the index of the first alarm
            delays.setdefault(name, []).append(first_alarm(cd, load(f"s{seed}_{name}")))
        print(f"[seed {seed}] done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    def fmt(v: list[float]) -> str:
        a = np.array(v, dtype=float)
        valid = a[~np.isnan(a)]
        med = np.median(valid) if len(valid) else np.inf
        p90 = np.quantile(valid, 0.9) if len(valid) else np.inf
        found = float(np.mean(np.isfinite(a)))
        s = lambda q: f"{q:.0f}" if np.isfinite(q) else "miss"  # noqa: E731
        return f"{s(med):>6s} {s(p90):>6s} {found:6.2f}"

    ours_rl = manifest["ours_no_drift_run_length"]
    print(f"\nno drift, mean run length (capped at {int(10 * ert)} for Alibi, {int(50 * ert)} for tsugiki): "
          f"tsugiki {np.mean(ours_rl):.0f}, alibi {np.mean(run_lengths):.0f} (configured ERT {ert:g})")
    print(f"detection delay from the change, ERT {ert:g}, Alibi window {window}, {len(manifest['seeds'])} seeds "
          f"(median, p90, share detected within 2000 requests); Alibi on {x_ref.shape[1]} feature columns")
    print(f"{'scenario':32s} {'tsugiki (CUSUM)':>20s}   {'alibi MMDDriftOnline':>20s}")
    for name in scenarios:
        print(f"{name:32s} {fmt(manifest['ours'][name])}   {fmt(delays[name])}")
    print("RESULT_JSON " + json.dumps({"ert": ert, "window": window, "alibi_columns": int(x_ref.shape[1]),
                                       "alibi": delays, "ours": manifest["ours"],
                                       "alibi_no_drift_run_length": run_lengths}, default=float))


if __name__ == "__main__":
    main()
