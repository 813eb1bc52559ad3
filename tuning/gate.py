"""The regression gate: a candidate adapter's numbers against configured thresholds.

Measured on validation data (never the training split): clean accuracy, accuracy under each corruption
family, negative flips against the incumbent version (examples it got right and the candidate gets wrong),
and retained behaviour outside the task (agreement of next-token predictions with the base model on
out-of-task text, which catches a partial update that broke what the model did before).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tsugiki.tuning.config import GateConfig


@dataclass
class GateReport:
    clean_accuracy: float
    family_accuracy: dict[str, float]
    negative_flip_rate: float | None  # None: no incumbent
    retained_agreement: float | None  # None: no out-of-task text
    base_accuracy: float | None = None  # the base model (adapter off) on the same clean validation data
    strength: float = 1.0
    n_val: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def negative_flip_rate(incumbent: np.ndarray, candidate: np.ndarray) -> float:
    """Share of examples the incumbent got right and the candidate gets wrong."""
    return float(np.mean(incumbent & ~candidate)) if len(incumbent) else 0.0


def agreement(base: list[np.ndarray], cand: list[np.ndarray]) -> float:
    same = sum(int((a == b).sum()) for a, b in zip(base, cand))
    total = sum(len(a) for a in base)
    return same / total if total else 1.0


def decide(cfg: GateConfig, *, clean: np.ndarray, families: dict[str, np.ndarray],
           incumbent: np.ndarray | None, retained: float | None, strength: float = 1.0,
           base: np.ndarray | None = None) -> GateReport:
    """Apply the thresholds; every failing check is named with its number and its limit."""
    acc = float(np.mean(clean)) if len(clean) else 0.0
    fam = {f: float(np.mean(v)) for f, v in families.items()}
    nfr = negative_flip_rate(incumbent, clean) if incumbent is not None else None
    base_acc = float(np.mean(base)) if base is not None and len(base) else None
    failures = []
    if base_acc is not None and acc < base_acc + cfg.min_gain_over_base - 1e-9:
        failures.append(f"clean accuracy {acc:.3f} does not beat the base model's {base_acc:.3f} by "
                        f"{cfg.min_gain_over_base}")
    if acc < cfg.min_clean_accuracy:
        failures.append(f"clean accuracy {acc:.3f} < {cfg.min_clean_accuracy}")
    for f, a in fam.items():
        if acc - a > cfg.max_family_drop + 1e-9:  # accuracies are ratios of small counts
            failures.append(f"accuracy under {f} drops {acc - a:.3f} > {cfg.max_family_drop}")
    if nfr is not None and nfr > cfg.max_negative_flip_rate + 1e-9:
        failures.append(f"negative flip rate {nfr:.3f} > {cfg.max_negative_flip_rate} against the incumbent")
    if retained is not None and retained < cfg.min_retained_agreement:
        failures.append(f"retained agreement with the base model {retained:.3f} < {cfg.min_retained_agreement} "
                        f"on out-of-task text")
    return GateReport(clean_accuracy=acc, family_accuracy=fam, negative_flip_rate=nfr, retained_agreement=retained,
                      base_accuracy=base_acc, strength=strength, n_val=len(clean), failures=failures)
