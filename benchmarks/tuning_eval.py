"""Tuning benchmark on a CLINC150 intent task sized for 2 CPU cores: robust partial LoRA against plain all-layer
LoRA, full fine-tuning and the zero-shot base model.

    python benchmarks/tuning_eval.py                       # all four methods, each in its own process
    python benchmarks/tuning_eval.py --per-intent 10       # a smaller task
    python benchmarks/tuning_eval.py --methods robust_all  # the robust recipe on every layer (the slowest)
    python benchmarks/tuning_eval.py --methods robust_denoise  # ... with the optional denoiser on layers 0-5
    python benchmarks/tuning_eval.py --methods lexicon_partial  # the top layers behind a lexicon, no augmentation
    python benchmarks/tuning_eval.py --seed 1 --methods plain_lora,robust_partial,full_ft  # another training seed

Task (stated in the output): 5 CLINC150 domains (banking, credit_cards, kitchen_and_dining, travel, utility;
75 intents), ``--per-intent`` training queries per intent from the official train split, test on
``--test-per-intent`` queries per intent of the official test split. All methods train with the same epochs,
batch size and data through the same code (tsugiki.tuning.trainer); each runs in a fresh process so its peak
memory (max RSS) is its own. Reported per method: clean test accuracy, accuracy under each corruption family at
``--severity`` (typos at 0.3 = 30% of words corrupted: "heavy typos"), training wall time, peak RSS, trainable
parameters, torch threads; then the bars of issue 4, with paired bootstrap intervals where both sides of a bar
kept per-query hits. The intervals cover the test queries' sampling only; ``--seed`` retrains with another training
seed (the same task, the same corrupted test queries), to see the training seed's share of the spread. Each task
(the settings in :func:`task_key`) has a results file of its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
DOMAINS = ["banking", "credit_cards", "kitchen_and_dining", "travel", "utility"]
FAMILIES = ["typos", "keyboard", "ocr", "delete", "mojibake", "code_switch"]
METHODS = ["zero_shot", "plain_lora", "robust_partial", "full_ft"]
# opt-in (--methods): the robust recipe on every layer (~24 min on 2 cores with its evaluation); the robust
# partial recipe with the optional denoiser stage on layers 0-5 (tuning/denoise.py, 3 epochs: ~8 min more); the
# top layers behind a lexicon with no noise augmentation (robust: {copies: 0}: the cheapest robust recipe)
EXTRA_METHODS = ["robust_all", "robust_denoise", "lexicon_partial"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pick(rows: list, intents: set[str], per: int, rng: np.random.Generator) -> list:
    """Up to ``per`` random (text, intent) rows of each of ``intents`` (sorted by intent) as label examples."""
    from tsugiki.tuning.data import Example, label_prompt

    by: dict[str, list[str]] = {}
    for t, i in rows:
        if i in intents:
            by.setdefault(i, []).append(t)
    out = []
    for i in sorted(by):
        texts = by[i]
        for j in rng.permutation(len(texts))[:per]:
            out.append(Example(label_prompt(texts[j]), " " + i, text=texts[j], label=i))
    return out


def task_intents(data_dir: Path) -> tuple[dict, set[str]]:
    """CLINC150's splits and the intents of :data:`DOMAINS`."""
    data = json.loads((data_dir / "data_full.json").read_text())
    domains = json.loads((data_dir / "domains.json").read_text())
    return data, {i for d in DOMAINS for i in domains[d]}


def task(args: argparse.Namespace) -> tuple[list, list, list]:
    from tsugiki.tuning.data import split

    data, intents = task_intents(args.data)
    rng = np.random.default_rng(0)
    pool = pick(data["train"], intents, args.per_intent, rng)
    train, val = split(pool, 0.1)
    test = pick(data["test"], intents, args.test_per_intent, rng)
    return train, val, test


def task_key(args: argparse.Namespace) -> dict:
    """What makes two methods' results comparable (kept with each result)."""
    return {k: getattr(args, k) for k in ("per_intent", "test_per_intent", "epochs", "batch_size", "severity",
                                          "threads", "seed")}


def default_out(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Path:
    """``benchmarks/results/tuning_eval.json`` for the default task; another task's file names the settings that
    differ (``tuning_eval_seed1.json``), so a run on it never replaces the default task's entries."""
    changed = [f"{k}{v}" for k, v in task_key(args).items() if v != ap.get_default(k)]
    return Path("benchmarks/results") / ("_".join(["tuning_eval", *changed]) + ".json")


def configs(args: argparse.Namespace) -> dict:
    from tsugiki.tuning.config import GateConfig, RobustConfig, TuneConfig

    common = dict(epochs=args.epochs, batch_size=args.batch_size, num_cpus=args.threads, seed=args.seed,
                  max_eval_examples=10**6, gate=GateConfig(severity=args.severity))
    robust = RobustConfig(severity=args.severity)
    partial = TuneConfig(layers="upper", num_layers=args.num_layers, learning_rate=args.partial_lr, robust=robust,
                         frozen_dtype=args.frozen_dtype, **common)
    return {
        "plain_lora": TuneConfig(layers="all", robust=None, learning_rate=args.lora_lr, **common),
        "robust_partial": partial,
        "full_ft": TuneConfig(method="full", robust=None, learning_rate=args.full_lr, **common),
        "robust_denoise": partial.model_copy(update={"robust": robust.model_copy(update={"denoise_layers": 6})}),
        "robust_all": TuneConfig(layers="all", learning_rate=args.lora_lr, robust=RobustConfig(severity=args.severity),
                                 **common),
        "lexicon_partial": partial.model_copy(update={"robust": robust.model_copy(update={"copies": 0})}),
    }


def run_one(args: argparse.Namespace, method: str) -> dict:
    import torch
    from _common import machine

    from tsugiki.config import ModelConfig
    from tsugiki.serve.base_model import load_base_model, set_torch_threads
    from tsugiki.tuning.data import TuningData
    from tsugiki.tuning.job import build_lexicon, default_retain_texts, fit, pick_strength
    from tsugiki.tuning.trainer import evaluate, peak_rss_mb

    threads = set_torch_threads(args.threads)
    train, val, test = task(args)
    loaded = load_base_model(ModelConfig(), progress=False)
    tok = loaded.tokenizer
    rss0 = peak_rss_mb()
    out: dict = {"method": method, "task": task_key(args), "torch_threads": threads, "train": len(train),
                 "val": len(val), "test": len(test), "rss_before_mb": rss0,
                 # times are compared only between entries of one machine (see the wall-time bar)
                 "machine": machine(), "measured_on": time.strftime("%Y-%m-%d", time.gmtime())}
    model = loaded.model
    lexicon = None
    if method != "zero_shot":
        cfg = configs(args)[method]
        data = TuningData(train=train, val=val, data_hash="bench", labels=[])
        t0 = time.time()
        lexicon = build_lexicon(cfg, tok, train)  # the word recognition the adapter ships (robust.lexicon)
        model, res = fit(cfg, loaded, data, progress=True, lexicon=lexicon)
        # the lexicon and all of fit(): layer choice, model build, encoding and corrupting, the frozen pass, the steps
        out.update(config=cfg.model_dump(mode="json"),  # the recipe as run (schedule, worst-of, ...)
                   train_seconds=time.time() - t0, frozen_pass=res.frozen_pass, loop_seconds=res.seconds,
                   steps=res.steps,
                   trainable_params=res.trainable_params, layers=res.layers,
                   final_loss=res.final_loss, peak_rss_mb=peak_rss_mb(), denoise=res.denoise)
        if cfg.robust is not None:
            t0 = time.time()
            strength, table = pick_strength(cfg, model, tok, val, res.layers, retain_texts=default_retain_texts(),
                                            lexicon=lexicon)
            out.update(strength=strength, strength_table=table, strength_seconds=time.time() - t0,
                       lexicon=None if lexicon is None else {"words": len(lexicon.counts),
                                                             "known": len(lexicon.known)})
    model.eval()
    t0 = time.time()
    with torch.no_grad():
        # what the gateway serves: the adapter behind its lexicon, when it ships one
        hits = {"clean": evaluate(model, tok, test, batch_size=32, lexicon=lexicon)}
        for fam in FAMILIES:
            hits[fam] = evaluate(model, tok, test, family=fam, severity=args.severity, seed=7, batch_size=32,
                                 lexicon=lexicon)
            log(f"{method}: {fam} {hits[fam].mean():.3f}")
        if lexicon is not None:  # the same adapter without it: what the training alone gives
            raw = {"clean": evaluate(model, tok, test, batch_size=32),
                   "typos": evaluate(model, tok, test, family="typos", severity=args.severity, seed=7, batch_size=32)}
            out["accuracy_without_lexicon"] = {k: float(v.mean()) for k, v in raw.items()}
            log(f"{method} without its lexicon: clean {raw['clean'].mean():.3f}, typos {raw['typos'].mean():.3f}")
    # per-query hits ("0"/"1" per test query, in test order) let the bars carry paired bootstrap intervals
    out.update(accuracy={k: float(v.mean()) for k, v in hits.items()},
               hits={k: "".join("1" if x else "0" for x in v) for k, v in hits.items()},
               eval_seconds=time.time() - t0)
    return out


def drop_ratio(p: dict, q: dict) -> float:
    """q's heavy-typo drop over p's, from their accuracies."""
    dp = p["clean"] - p["typos"]
    return float((q["clean"] - q["typos"]) / dp) if dp else float("nan")


def clean_diff(p: dict, q: dict) -> float:
    return float(q["clean"] - p["clean"])


def same_machine(*results: dict) -> bool:
    """Whether the entries' times were measured on one kind of machine with the same torch threads (entries from
    before session 18 did not record their machine, and count as unknown)."""
    kinds = [(r.get("machine"), r.get("torch_threads")) for r in results]
    return all(k[0] is not None and k == kinds[0] for k in kinds)


def where(r: dict) -> str:
    m = r.get("machine")
    if m is None:
        return "an unrecorded machine"
    return (f"{m['cpu']} ({m['cores']} cores, {'/'.join(m['flags']) or 'no AVX2 or AVX-512'}, "
            f"{r.get('torch_threads')} torch threads) on {r.get('measured_on', '?')}")


def interval(stat: Callable[..., float], *results: dict, reps: int = 2000) -> str:
    """Paired bootstrap 95% interval of ``stat`` (a function of the methods' accuracies) over the test queries,
    resampled together for every method (they answered the same queries); empty when a method's stored result
    predates per-query hits."""
    if any("hits" not in r for r in results):
        return ""
    arrays = [{k: np.array([c == "1" for c in v]) for k, v in r["hits"].items()} for r in results]
    n = len(arrays[0]["clean"])
    rng = np.random.default_rng(0)
    vals = []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        vals.append(stat(*({k: v[idx].mean() for k, v in a.items()} for a in arrays)))
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return f" [95% interval {lo:.2f} to {hi:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--per-intent", type=int, default=20)
    ap.add_argument("--test-per-intent", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-layers", type=int, default=8)
    # each method at the rate it did best with on the val split (tuning_recipes.py): plain and all-layer LoRA at
    # 3e-3, the partial recipes at 5e-3 (the job's default)
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="plain_lora and robust_all")
    ap.add_argument("--partial-lr", type=float, default=5e-3, help="robust_partial, robust_denoise, lexicon_partial")
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--severity", type=float, default=0.3)
    ap.add_argument("--frozen-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="precision of robust_partial's frozen pass (TuneConfig.frozen_dtype)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--only", choices=METHODS + EXTRA_METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help="training seed of every method (TuneConfig.seed: data "
                    "order, corrupted copies, LoRA init); the task and the test corruption stay fixed")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/tuning_eval.json; a task "
                                            "other than the default's gets a name of its own, e.g. "
                                            "tuning_eval_seed1.json, so it never replaces the default's entries)")
    args = ap.parse_args()
    if args.out is None:
        args.out = default_out(args, ap)
    if args.only:
        print("RESULT_JSON " + json.dumps(run_one(args, args.only)), flush=True)
        return
    results = {}
    for m in args.methods.split(","):
        log(f"--- {m} (own process)")
        passed = {k: v for k, v in vars(args).items() if k not in ("only", "methods")}
        cmd = [sys.executable, __file__, "--only", m] + [x for k, v in passed.items()
                                                         for x in (f"--{k.replace('_', '-')}", str(v))]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT_JSON ")]
        if proc.returncode or not line:
            raise SystemExit(f"{m} failed with exit status {proc.returncode}")
        results[m] = json.loads(line[-1][len("RESULT_JSON "):])
    # a run of some methods updates their entries and keeps the others' that were measured on the same task;
    # the table and the bars read both (earlier runs are marked *)
    kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = {m: r for m, r in kept.items() if r.get("task") == task_key(args) and m not in results}
    every = {**kept, **results}
    r0 = next(iter(results.values()))
    print(f"\nCLINC150 task: domains {', '.join(DOMAINS)} (75 intents); {r0['train']} train / {r0['val']} val "
          f"queries ({args.per_intent} per intent from the official train split, content-hash split), "
          f"test {r0['test']} queries ({args.test_per_intent} per intent, official test split); "
          f"{args.epochs} epochs, batch {args.batch_size}; training seed {args.seed}; "
          f"corruption severity {args.severity}; "
          f"torch threads {r0['torch_threads']}")
    cols = ["clean"] + FAMILIES
    print(f"{'method':16s} " + " ".join(f"{c:>11s}" for c in cols) + f" {'train s':>8s} {'peak MB':>8s} "
          f"{'trainable':>11s} {'frozen pass':>11s}")
    for m, r in every.items():
        a = r["accuracy"]
        print(f"{m + ('*' if m in kept else ''):16s} " + " ".join(f"{a[c]:11.3f}" for c in cols)
              + f" {r.get('train_seconds', 0):8.0f} {r.get('peak_rss_mb', r['rss_before_mb']):8.0f} "
              f"{r.get('trainable_params', 0):11d} {r.get('frozen_pass', '-'):>11s}")
    if kept:
        print("* from an earlier run on the same task (" + args.out.as_posix() + ")")
    # each bar where this run measured one of its sides (robust_all: how far augmentation goes at full depth)
    for robust in ("robust_partial", "robust_denoise", "robust_all", "lexicon_partial"):
        if {"plain_lora", robust} <= every.keys() and {"plain_lora", robust} & results.keys():
            p, q = every["plain_lora"]["accuracy"], every[robust]["accuracy"]
            pair = (every["plain_lora"], every[robust])
            print(f"heavy-typo drop: plain LoRA {p['clean'] - p['typos']:.3f}, {robust} {q['clean'] - q['typos']:.3f} "
                  f"(ratio {drop_ratio(p, q):.2f}{interval(drop_ratio, *pair)}, bar <= 0.5); clean difference "
                  f"{robust} - plain {clean_diff(p, q):+.3f}{interval(clean_diff, *pair)} (bar >= -0.01)")
        if {"full_ft", robust} <= every.keys() and {"full_ft", robust} & results.keys():
            f, q = every["full_ft"], every[robust]
            q_s = q["train_seconds"] + q.get("strength_seconds", 0.0)  # the strength choice is part of its tuning
            times = (f"{robust} (training {q['train_seconds']:.0f} s + strength choice "
                     f"{q.get('strength_seconds', 0):.0f} s) / full FT ({f['train_seconds']:.0f} s)")
            if same_machine(f, q):
                ratio = f"{q_s / f['train_seconds']:.2f} (bar <= 0.33)"
            else:  # a ratio of times from two machines measures the machines
                ratio = (f"not compared: full FT ran on {where(f)}, {robust} on {where(q)}; rerun both "
                         f"(--methods full_ft,{robust})")
            print(f"wall time {times}: {ratio}; clean difference {robust} - full "
                  f"{clean_diff(f['accuracy'], q['accuracy']):+.3f}{interval(clean_diff, f, q)} "
                  "(bar >= -0.01)")
    for m, r in results.items():
        if "accuracy_without_lexicon" in r:  # what the training alone gives, the same adapter without the lexicon
            a, w = r["accuracy"], r["accuracy_without_lexicon"]
            print(f"{m} without its lexicon: clean {w['clean']:.3f}, heavy typos {w['typos']:.3f} (drop "
                  f"{w['clean'] - w['typos']:.3f}; behind it {a['clean']:.3f}, {a['typos']:.3f}, drop "
                  f"{a['clean'] - a['typos']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(every, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
