"""Cheap early validation: a Ray Tune ASHA screen over rank, learning rate and layer choice on a small slice
of the data, before the real run.

Every trial trains on ``subset`` training examples and reports validation loss (teacher-forced cross-entropy of
the completions: continuous, so trials never tie, and cheap) after each epoch; ASHA
(asynchronous successive halving) stops the worse half of the trials at each rung, so poor configurations
cost one or two epochs instead of a whole run. The result records every trial (configuration, accuracy per
epoch, where it stopped) and why the winner won.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tsugiki.tuning.config import TuneConfig
from tsugiki.tuning.data import TuningData

log = logging.getLogger("tsugiki.tuning")

DEFAULT_SPACE: dict[str, list[Any]] = {"rank": [4, 16], "learning_rate": [3e-4, 2e-3], "num_layers": [4, 8]}


@dataclass
class ScreenResult:
    best: dict[str, Any]
    why: str
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, cfg: TuneConfig) -> TuneConfig:
        return cfg.model_copy(update=self.best)


def _trial(config: dict[str, Any], base: TuneConfig, data: TuningData) -> None:
    """One Ray Tune trial: train the updated configuration epoch by epoch, report validation accuracy."""
    from ray import tune

    from tsugiki.serve.base_model import load_base_model, set_torch_threads
    from tsugiki.tuning.job import build_model, choose_layers, training_lexicon
    from tsugiki.tuning.trainer import Trainer

    cfg = base.model_copy(update=config)
    set_torch_threads(max(1, int(cfg.num_cpus)))
    loaded = load_base_model(cfg.model, progress=False)
    layers, scores = choose_layers(cfg, loaded.model, loaded.tokenizer, data.train)
    model = build_model(cfg, loaded.model, layers)
    # with corrected_copies the trial trains (and scores) on the inputs as the lexicon serves them, as fit() does
    lexicon = training_lexicon(cfg, loaded.tokenizer, data.train)
    trainer = Trainer(cfg, model, loaded.tokenizer, data.train, layers=layers, layer_scores=scores, progress=False,
                      lexicon=lexicon)
    scorer = Trainer(cfg, model, loaded.tokenizer, data.val, layers=layers, progress=False, lexicon=lexicon)

    def report(epoch: int) -> None:
        tune.report({"val_loss": scorer.mean_loss(0), "epoch": epoch + 1})

    trainer.train(on_epoch=report)


def screen(cfg: TuneConfig, data: TuningData, *, space: dict[str, list[Any]] | None = None, subset: int = 200,
           val_subset: int = 100, epochs: int = 3, storage: str | Path | None = None,
           max_concurrent: int | None = None) -> ScreenResult:
    """Grid over ``space`` (each key a TuneConfig field) with ASHA early stopping; returns the winner."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = space or DEFAULT_SPACE
    unknown = set(space) - set(TuneConfig.model_fields)
    if unknown:
        raise ValueError(f"screen space keys {sorted(unknown)} are not TuneConfig fields")
    small = TuningData(train=data.train[:subset], val=data.val[:val_subset], data_hash=data.data_hash,
                       labels=data.labels, source=data.source)
    base = cfg.model_copy(update={"epochs": epochs, "robust": None, "checkpoint_every": 10**9})
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, data=small),
                                    {"cpu": cfg.num_cpus, "gpu": cfg.num_gpus})
    own = storage is None
    storage = Path(storage or tempfile.mkdtemp(prefix="tsugiki-screen-"))
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in space.items()},
        tune_config=tune.TuneConfig(scheduler=ASHAScheduler(metric="val_loss", mode="min", max_t=epochs,
                                                            grace_period=1, reduction_factor=2),
                                    max_concurrent_trials=max_concurrent or max(
                                        1, int((os.cpu_count() or 1) // cfg.num_cpus))),
        run_config=tune.RunConfig(storage_path=str(storage.resolve()), name="screen", verbose=0),
    )
    trials: list[dict[str, Any]] = []
    try:
        grid = tuner.fit()
        for i in range(len(grid)):
            r = grid[i]
            hist = r.metrics_dataframe
            losses = [float(a) for a in hist["val_loss"]] if hist is not None and len(hist) else []
            trials.append({"config": {k: (r.config or {}).get(k) for k in space}, "val_loss": losses,
                           "epochs_run": len(losses), "stopped_early": len(losses) < epochs,
                           "error": str(r.error) if r.error else None})
    finally:
        if own:
            shutil.rmtree(storage, ignore_errors=True)
    done = [t for t in trials if t["val_loss"]]
    if not done:
        raise RuntimeError(f"every screen trial failed: {[t['error'] for t in trials]}")
    best = min(done, key=lambda t: (-t["epochs_run"], t["val_loss"][-1]))
    stopped = [t for t in trials if t["stopped_early"]]
    why = (f"{best['config']} reached validation loss {best['val_loss'][-1]:.4f} after {best['epochs_run']} epochs "
           f"on {len(small.train)} examples, the lowest of {len(trials)} trials; ASHA stopped {len(stopped)} "
           f"early (" + ", ".join(f"{t['config']} at epoch {t['epochs_run']} with {t['val_loss'][-1]:.4f}"
                                  for t in stopped if t["val_loss"]) + ")")
    log.info("screen: %s", why)
    return ScreenResult(best=best["config"], why=why, trials=trials)
