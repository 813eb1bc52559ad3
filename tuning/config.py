"""Settings of a tuning run, its robustness recipe, its screen and its regression gate (pydantic, frozen)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tsugiki.config import ModelConfig
from tsugiki.monitoring.reference import MIN_REFERENCE

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_families(v: tuple[str, ...]) -> tuple[str, ...]:
    from tsugiki.monitoring.corruption import FAMILIES

    bad = [f for f in v if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown corruption families {bad}; choose from {sorted(FAMILIES)}")
    return v


class RobustConfig(_Frozen):
    """Noise augmentation with the monitor's corruption families plus a clean/noisy consistency term."""

    families: tuple[str, ...] = Field(
        default=("typos", "keyboard", "ocr", "delete", "swap", "typos", "mojibake", "code_switch"),
        description="Families the copies cycle through; one listed twice is drawn twice as often (the default "
                    "weights typing errors: mixed typos twice, 6 of 8 draws character-level).")
    severity: float = Field(default=0.3, gt=0, le=1, description="Share of words corrupted in a noisy copy.")
    copies: int = Field(default=3, ge=0, description="Corrupted copies per example, from consecutive entries of "
                                                     "`families`; epoch e trains on copy e mod copies (0 = no "
                                                     "augmentation; a family that finds nothing to corrupt "
                                                     "makes no copy).")
    consistency_weight: float = Field(default=1.0, ge=0,
                                      description="Weight of KL(clean || noisy) over the completion tokens.")
    worst_of: bool = Field(default=False, description="Each step trains on the copy the model currently gets "
                                                      "most wrong (highest loss of all `copies`, one extra forward "
                                                      "pass of the copies per step) instead of cycling through "
                                                      "them: worst-of-k adversarial augmentation. Without a lexicon "
                                                      "it cut the heavy-typo drop on CLINC150's val split from "
                                                      "0.142 to 0.111; behind the lexicon (the default) the drop "
                                                      "was 0.036 with it and 0.044 without, at clean accuracy "
                                                      "0.922 and 0.936, and the steps take 1.75x as long, so it is "
                                                      "off by default (benchmarks/README.md).")
    lexicon: bool = Field(default=True, description="Ship a word-recognition lexicon of the training texts with "
                                                    "the adapter (tsugiki/adapters/lexicon.py): the gateway maps "
                                                    "a request's misspelled words back to the task's words "
                                                    "before the model reads them, and the strength choice and the "
                                                    "gate measure the adapter behind it. It leaves the trained "
                                                    "weights as they are.")
    corrected_copies: bool = Field(default=False,
                                   description="Train on the inputs as the gateway serves them: clean inputs and "
                                               "corrupted copies read through the adapter's lexicon (needs "
                                               "`lexicon`). A copy the lexicon restores to the clean input has "
                                               "nothing to teach and skips its noisy pass (48% of them on "
                                               "CLINC150 at severity 0.3), so the run costs less. Off by default: "
                                               "on CLINC150's val split it took 286 s against 362 s but scored "
                                               "0.913 clean and 0.876 with heavy typos against 0.936 and 0.891 "
                                               "(the raw copies' noise regularises; benchmarks/README.md).")
    denoise_layers: int = Field(default=0, ge=0,
                                description="Lowest layers (0..n-1, below the task layers) given a LoRA trained "
                                            "first to map corrupted inputs' hidden states onto the clean "
                                            "input's, word by word (tuning/denoise.py); 0: off. Off by default "
                                            "for its cost: 6 layers (3 epochs) cut the heavy-typo drop from 0.13 "
                                            "to 0.10 on CLINC150's val split but only from 0.151 to 0.144 on its "
                                            "test split, for ~450 s more on 2 cores than the ~350 s of the rest "
                                            "(benchmarks/README.md).")
    denoise_epochs: int = Field(default=3, gt=0, description="Passes over the alignable noisy copies (on the "
                                                              "val split 3 passes at 3e-3 beat 1 at 1e-3).")
    denoise_lr: float = Field(default=3e-3, gt=0)
    strengths: tuple[float, ...] = Field(default=(0.5, 0.75, 1.0),
                                         description="Adapter scales tried (weight-space interpolation with the "
                                                     "base model, WiSE-FT); the best on clean+noisy validation "
                                                     "is kept.")

    _families = field_validator("families")(_check_families)

    @field_validator("strengths")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 for x in v):
            raise ValueError(f"strengths must be above 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _corrected_needs_lexicon(self) -> RobustConfig:
        if self.corrected_copies and not self.lexicon:
            raise ValueError("corrected_copies reads the training inputs through the lexicon: set lexicon to true, "
                             "or corrected_copies to false")
        return self


class GateConfig(_Frozen):
    """Thresholds a candidate must meet before it is written to the adapter store."""

    min_clean_accuracy: float = Field(default=0.0, ge=0, le=1)
    min_gain_over_base: float = Field(default=0.05, ge=-1, le=1,
                                      description="Clean accuracy must beat the base model's (adapter off) by this.")
    max_family_drop: float = Field(default=0.3, ge=0, le=1,
                                   description="Largest allowed clean-minus-noisy accuracy, per family.")
    max_negative_flip_rate: float = Field(default=0.05, ge=0, le=1,
                                          description="Share of validation examples the incumbent got right and "
                                                      "the candidate gets wrong.")
    min_retained_agreement: float = Field(default=0.15, ge=0, le=1,
                                          description="Share of next-token predictions on out-of-task text that "
                                                      "agree with the base model (catches side effects). A "
                                                      "15-intent adapter on the top 4 of 30 layers keeps 0.23 "
                                                      "(3 epochs at 3e-3) to 0.38 (at 1e-3) on CLINC150's "
                                                      "out-of-scope queries, a 75-intent one on the top 8 "
                                                      "0.33 (strength 0.75; `tsugiki tune` with the defaults "
                                                      "on tuning_eval's task); a broken one falls towards 0.")
    severity: float = Field(default=0.3, gt=0, le=1, description="Corruption severity of the per-family check.")
    families: tuple[str, ...] = ("typos", "keyboard", "ocr", "mojibake", "code_switch")

    _families = field_validator("families")(_check_families)


class TuneConfig(_Frozen):
    """One tuning run. ``method`` 'lora' tunes the chosen layers; 'full' is full fine-tuning (a baseline)."""

    model: ModelConfig = ModelConfig()
    method: Literal["lora", "full"] = "lora"
    layers: Literal["upper", "probe", "all"] | tuple[int, ...] = Field(
        default="upper", description="'upper': the top `num_layers`; 'probe': the `num_layers` with the largest "
                                     "gradient on a probe batch; 'all'; or explicit indices.")
    num_layers: int = Field(default=8, gt=0, description="Layers tuned by 'upper' and 'probe'. Robustness "
                                                          "needs depth: on CLINC150's val split three corrupted "
                                                          "copies did not lift heavy-typo accuracy with the top 4 "
                                                          "of 30 layers, with the top 8 they did, by 9 points. On "
                                                          "its test (benchmarks/tuning_eval.py, at a constant "
                                                          "learning rate) the top 8 with "
                                                          "three copies score 0.880 clean, 0.729 with heavy "
                                                          "typos; the earlier default (top 4, one copy) 0.840 and "
                                                          "0.671; plain all-layer LoRA 0.829 and 0.613.")
    target_modules: tuple[str, ...] = ATTENTION + MLP
    rank: int = Field(default=8, gt=0, le=256)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    learning_rate: float = Field(default=5e-3, gt=0,
                                 description="Peak learning rate (of LoRA's A matrices with `loraplus_ratio`). On "
                                             "CLINC150's val split 5e-3 beat 3e-3 for the default recipe (0.942 "
                                             "clean, 0.893 with heavy typos against 0.936 and 0.891) and without "
                                             "augmentation (0.918 against 0.911); plain all-layer LoRA scored 0.929 "
                                             "at 3e-3 and 0.922 at 5e-3 (benchmarks/README.md).")
    loraplus_ratio: float = Field(default=1.0, ge=1,
                                  description="LoRA+ (Hayou et al., 2024): LoRA's B matrices learn this many times "
                                              "faster than its A matrices (`learning_rate`); 1: plain LoRA. On "
                                              "CLINC150's val split it did not lift the top 8 layers' clean "
                                              "accuracy without augmentation (0.920 against 0.918; "
                                              "benchmarks/README.md).")
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: Literal["constant", "linear"] = Field(
        default="linear", description="'linear': warm up over `warmup_ratio` of the steps, then decay to 0 (as "
                                      "transformers' Trainer does by default). On CLINC150's val split it lifted "
                                      "the robust recipe's clean accuracy from 0.884 to 0.938 and plain LoRA's "
                                      "from 0.893 to 0.929 (benchmarks/README.md).")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    epochs: int = Field(default=3, gt=0)
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=128, gt=8, description="Tokens per example (prompt + completion), cut left.")
    val_share: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0
    robust: RobustConfig | None = RobustConfig()
    gate: GateConfig = GateConfig()
    cache_frozen: bool = Field(default=True, description="Compute the frozen layers below the lowest tuned layer "
                                                         "once per input instead of every epoch.")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Precision of the one-time pass through the frozen layers below the lowest "
                                    "tuned layer: 'auto' is bfloat16 where the hardware computes it natively "
                                    "(AVX512-BF16/AMX CPUs, bf16 GPUs), else float32. Training keeps the "
                                    "model's precision.")
    checkpoint_every: int = Field(default=50, gt=0, description="Steps between resumable checkpoints.")
    eval_batch_size: int = Field(default=32, gt=0)
    max_eval_examples: int = Field(default=400, gt=0, description="Validation examples scored per check.")
    drift_reference: int = Field(default=500, ge=0, description="Training prompts whose monitor features (and "
                                                                "noise signals) ship with a passing adapter as "
                                                                "its drift reference "
                                                                "(monitoring/reference.py; at least 50 distinct "
                                                                "prompts); 0: none, the adapter's first requests "
                                                                "become its reference.")
    num_cpus: float = Field(default=2, gt=0, description="CPUs the Ray task declares (and torch threads).")
    num_gpus: float = Field(default=0, ge=0)

    @field_validator("drift_reference")
    @classmethod
    def _reference_size(cls, v: int) -> int:
        if 0 < v < MIN_REFERENCE:
            raise ValueError(f"drift_reference is 0 (none) or at least {MIN_REFERENCE} prompts (fewer cannot "
                             "calibrate a drift detector)")
        return v

    def fingerprint(self) -> str:
        """Hash of what determines the trained weights (not the gate, the strength grid, the lexicon, resources
        or evaluation sizes): a rejected run rerun with a looser gate resumes instead of retraining."""
        d = self.model_dump(mode="json", exclude={"gate", "num_cpus", "num_gpus", "eval_batch_size",
                                                  "max_eval_examples", "checkpoint_every", "drift_reference"})
        if d.get("robust"):
            d["robust"].pop("strengths", None)
            if not d["robust"].get("corrected_copies"):  # then the lexicon shapes the training inputs
                d["robust"].pop("lexicon", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
