"""Tuning: the Ray job that produces robust adapters cheaply, with a regression gate.

- :mod:`~tsugiki.tuning.data`: JSON Lines records, validation, the content-hash split and data hash;
- :mod:`~tsugiki.tuning.config`: ``TuneConfig`` (layers, rank, robustness, gate, resources);
- :mod:`~tsugiki.tuning.trainer`: the training loop (frozen-prefix caching, augmentation, consistency,
  checkpoints) and evaluation;
- :mod:`~tsugiki.tuning.gate`: the regression gate's checks and thresholds;
- :mod:`~tsugiki.tuning.screen`: the Ray Tune ASHA screen;
- :mod:`~tsugiki.tuning.job`: the whole job, locally or as a Ray task (``tsugiki tune``).
"""
