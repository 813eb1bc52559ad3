"""Robust-recipe variants on a development split: which knobs move heavy-typo robustness, and at what cost.

    python benchmarks/tuning_recipes.py default '{}'
    python benchmarks/tuning_recipes.py plain_lora '{"layers": "all", "robust": null}'
    python benchmarks/tuning_recipes.py consistency3 '{"robust": {"consistency_weight": 3.0}}'
    python benchmarks/tuning_recipes.py top12 '{"num_layers": 12}'

Trains on tuning_eval.py's task (the same 1341 training and 159 validation queries, the same epochs and batch),
with TuneConfig overrides given as JSON (``robust`` holds RobustConfig overrides; null turns augmentation off),
picks the strength as the job does, and scores clean and heavy-typo accuracy (typos at 0.3) on 450 queries of
CLINC150's official *val* split (6 per intent, never the test split tuning_eval.py reports), at the chosen
strength and at 1.0. Each run appends a line (with its machine) to ``benchmarks/results/tuning_recipes.jsonl``;
about 6-10 minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import numpy as np
import tuning_eval as te
from _common import log, machine


def dev_split() -> list:
    """6 queries per intent of the task's intents from CLINC150's official val split."""
    data, intents = te.task_intents(te.DATA)
    return te.pick(data["val"], intents, 6, np.random.default_rng(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("overrides", help="TuneConfig fields as JSON; 'robust' holds RobustConfig fields or null")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tuning_recipes.jsonl"))
    args = ap.parse_args()

    import torch

    from tsugiki.config import ModelConfig
    from tsugiki.serve.base_model import load_base_model, set_torch_threads
    from tsugiki.tuning.config import RobustConfig, TuneConfig
    from tsugiki.tuning.data import TuningData
    from tsugiki.tuning.job import build_lexicon, default_retain_texts, fit, pick_strength, set_strength
    from tsugiki.tuning.trainer import evaluate

    threads = set_torch_threads(args.threads)
    over = json.loads(args.overrides)
    rob = over.pop("robust", {})
    kw: dict = dict(epochs=3, batch_size=16, num_cpus=args.threads, seed=0, max_eval_examples=10**6)
    kw.update(over)
    cfg = TuneConfig(robust=RobustConfig(**rob) if rob is not None else None, **kw)
    train, val, _ = te.task(types.SimpleNamespace(data=te.DATA, per_intent=20, test_per_intent=6))
    dev = dev_split()
    loaded = load_base_model(ModelConfig(), progress=False)
    log(f"{args.name}: training on {len(train)} queries, torch threads {threads}")
    t0 = time.time()
    lexicon = build_lexicon(cfg, loaded.tokenizer, train)
    model, res = fit(cfg, loaded, TuningData(train=train, val=val, data_hash="bench", labels=[]), progress=True,
                     lexicon=lexicon)
    train_s = time.time() - t0
    t0 = time.time()
    chosen, _ = pick_strength(cfg, model, loaded.tokenizer, val, res.layers, retain_texts=default_retain_texts(),
                              lexicon=lexicon)
    strength_s = time.time() - t0
    model.eval()
    acc = {}
    for s in sorted({chosen, 1.0}):
        if cfg.method == "lora":
            set_strength(model, s)
        # behind the lexicon when the recipe ships one (as served), and without it
        for key, lex in ([(str(s), lexicon)] + ([(f"{s} without lexicon", None)] if lexicon is not None else [])):
            with torch.no_grad():
                clean = float(np.mean(evaluate(model, loaded.tokenizer, dev, lexicon=lex)))
                typos = float(np.mean(evaluate(model, loaded.tokenizer, dev, family="typos", severity=0.3, seed=7,
                                               lexicon=lex)))
            acc[key] = {"clean": round(clean, 3), "typos": round(typos, 3), "drop": round(clean - typos, 3)}
    rec = {"name": args.name, "overrides": args.overrides, "torch_threads": threads, "dev": len(dev),
           "machine": machine(), "measured_on": time.strftime("%Y-%m-%d", time.gmtime()),  # times are the machine's
           "train_s": round(train_s, 1), "loop_s": round(res.seconds, 1), "strength_s": round(strength_s, 1),
           "layers": res.layers, "learning_rate": cfg.learning_rate, "chosen_strength": chosen, "accuracy": acc}
    print(json.dumps(rec), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
