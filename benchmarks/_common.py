"""Shared helpers for the benchmark scripts (not a public API).

Scripts in this folder run as ``python benchmarks/<name>.py``; they import this module as ``_common``
(the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle on the beach.",
    "Explain in simple words how a refrigerator keeps food cold, and why it makes a humming noise.",
    "List three reasons why people enjoy hiking in the mountains during the early autumn season.",
    "Describe the steps needed to bake a loaf of sourdough bread at home with a simple oven.",
    "What are the main differences between a violin and a viola, and how do their sounds compare?",
    "Summarise the plot of a detective novel in which the butler turns out to be entirely innocent.",
    "Give advice to a student who is nervous about speaking in front of the whole class tomorrow.",
    "Compose a polite email asking a neighbour to keep their dog quiet during the late evening hours.",
    "Tell me about the history of the printing press and its effect on how ideas spread in Europe.",
    "Why is the sky blue during the day but red and orange when the sun sets over the ocean?",
]


def log(msg: str) -> None:
    """Progress line on stderr, with a wall-clock stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup_threads() -> int:
    """Set torch intra-op threads the way the server does (0 = all cores) and print the count."""
    from tsugiki.serve.base_model import set_torch_threads

    n = set_torch_threads(0)
    log(f"torch.get_num_threads() = {torch.get_num_threads()} (set_torch_threads(0) -> {n})")
    return n


_TIMING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what torch's CPU kernels and frozen_dtype use


def machine() -> dict[str, Any]:
    """What a wall time depends on besides the code: the CPU model, its instruction sets that torch's kernels and
    the tuning loop's precision choice (``frozen_dtype``) look at, the cores and torch's version. Timings taken on
    different machines are not ratios of anything; scripts that keep results across runs compare these first."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": [f for f in _TIMING_FLAGS if f in flags],
            "torch": torch.__version__}


def default_model_dir() -> Path:
    """The converted default base model directory (converted once if missing)."""
    from tsugiki.serve.base_model import convert_default_model

    return convert_default_model(progress=True)


def make_adapters(base_dir: Path, out_root: Path, n: int, *, r: int = 8, alpha: int = 16,
                  targets: str | list[str] = "all-linear", scale: float = 0.05, seed: int = 0,
                  prefix: str = "lora") -> list[tuple[str, Path]]:
    """Save ``n`` distinct PEFT LoRA adapters with random non-zero A and B for the model in ``base_dir``.

    One PEFT model is built and its LoRA weights re-randomised per adapter (faster than rebuilding it each
    time; the artifacts are the same as ``get_peft_model(...).save_pretrained``). Returns (name, path) pairs.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
        name = f"{prefix}{i}"
        path = out_root / name
        peft_model.save_pretrained(path)
        out.append((name, path))
    del peft_model, model
    return out


def pct(xs: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0-100) with linear interpolation (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print()
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if math.isnan(c):
            return "n/a"
        return f"{c:.3f}" if abs(c) < 100 else f"{c:.1f}"
    return str(c)


def print_json(obj: dict[str, Any]) -> None:
    """The machine-readable result: one JSON line on stdout, prefixed so it is easy to grep."""
    print("RESULT_JSON " + json.dumps(obj, sort_keys=True, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


class CpuMeter:
    """Measures how busy the machine's CPUs were with *other* processes while a block ran.

    ``foreign`` is the fraction of all cores' time (0..1) spent by anything but this process (all its threads),
    from ``/proc/stat`` minus ``os.times()``. On a shared box a high value means the measurement was disturbed.
    Linux only; elsewhere ``foreign`` stays NaN.
    """

    _FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal

    def __init__(self) -> None:
        self.foreign = float("nan")
        self.wall = 0.0
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._ncpu = os.cpu_count() or 1

    def _busy(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                parts = f.readline().split()[1:]
        except OSError:
            return None
        return sum(int(parts[i]) for i in self._FIELDS if i < len(parts)) / self._hz

    def __enter__(self) -> CpuMeter:  # noqa: PYI034
        self._b0, t = self._busy(), os.times()
        self._own0 = t.user + t.system
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        b1, t = self._busy(), os.times()
        if self._b0 is None or b1 is None or self.wall <= 0:
            return
        foreign = (b1 - self._b0) - (t.user + t.system - self._own0)
        self.foreign = min(1.0, max(0.0, foreign / (self.wall * self._ncpu)))


def measured(fn: Any, *, max_foreign: float, retries: int, what: str) -> tuple[Any, float, int]:
    """Run ``fn()`` under a :class:`CpuMeter`; re-run it (up to ``retries`` times) while other processes used more
    than ``max_foreign`` of the CPUs. Returns (result, foreign fraction of the kept run, re-runs made)."""
    for attempt in range(retries + 1):
        with CpuMeter() as m:
            res = fn()
        if not (m.foreign > max_foreign) or attempt == retries:
            return res, m.foreign, attempt
        log(f"  {what}: other processes used {m.foreign:.0%} of the CPUs during the run; re-running")
        time.sleep(1.0)
    raise AssertionError("unreachable")
