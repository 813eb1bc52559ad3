"""The training loop: partial LoRA (or full fine-tuning, as a baseline), noise augmentation, consistency,
frozen-prefix caching, resumable checkpoints, evaluation.

Where the time goes on CPU is backpropagation and the forward pass through layers that never change. With
LoRA on layers ``L0..`` only:

* the hidden states entering layer ``L0`` depend on the input alone, so each distinct input (a clean example
  or one of its fixed corrupted copies) goes through layers ``0..L0-1`` **once**, not once per epoch
  (``cache_frozen``);
* the token head all inputs share (a prompt template's first line: 11 of the ~29 tokens of a CLINC150 example)
  goes through the frozen layers once per run and through the trained ones once per batch, its keys and values
  reused by every input (without dropout exact: the same loss and gradients, for full fine-tuning too);
* where the hardware computes bfloat16 natively the frozen pass runs in it (``frozen_dtype``; about twice as
  fast; training keeps the model's own precision);
* the trained layers take each batch packed end to end into rows of about :data:`PACK_TOKENS` tokens, each
  input attending only to itself and the shared head, so nothing is padded to the width of the longest
  corrupted copy;
* backpropagation starts at the loss and stops at ``L0``;
* the LM head runs only at the positions that predict completion tokens.

Checkpoints hold only tensors (safetensors) and JSON: the trainable weights, AdamW's moments and the position
in the data order, which is a pure function of the seed and epoch; a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tsugiki.adapters.lexicon import Lexicon
from tsugiki.monitoring.corruption import corrupt
from tsugiki.serve.base_model import prompt_ids
from tsugiki.tuning.config import TuneConfig
from tsugiki.tuning.data import Example

log = logging.getLogger("tsugiki.tuning")
# PEFT asks transformers a deprecated question on every model it wraps; the warning is not ours to fix
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# ---------------------------------------------------------------------------------------------- tokenization
@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    n_prompt: int  # tokens before the completion; the loss covers ids[n_prompt:]


def encode(tokenizer: Any, prompt: str, completion: str, max_length: int) -> Encoded:
    p = prompt_ids(tokenizer, prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    c = c[: max_length - 1]
    p = p[-(max_length - len(c)):]  # cut the prompt from the left: the end of it matters most
    return Encoded(tuple(p + c), len(p))


def noisy_texts(ex: Example, cfg: TuneConfig, index: int) -> list[tuple[str, str]]:
    """(family, corrupted user text) of the example's fixed noisy copies (deterministic in seed, example index
    and copy); empty for examples without free text (chats)."""
    rc = cfg.robust
    if rc is None or rc.copies == 0 or not rc.families or ex.text is None:
        return []
    out = []
    for c in range(rc.copies):
        fam = rc.families[(index + c) % len(rc.families)]
        seed = (cfg.seed * 1_000_003 + index * 97 + c) % 2**31
        out.append((fam, corrupt(ex.text, fam, rc.severity, seed)))
    return out


def served_prompt(ex: Example, lexicon: Lexicon | None) -> str:
    """The example's prompt as the gateway hands it to the model: with ``lexicon``, the user's words corrected
    (:meth:`Lexicon.correct`)."""
    p = ex.noisy_prompt(lexicon.correct) if lexicon is not None else None
    return ex.prompt if p is None else p


def noisy_copies(ex: Example, cfg: TuneConfig, index: int, lexicon: Lexicon | None = None) -> list[str]:
    """The example's fixed corrupted prompts (:func:`noisy_texts` in the example's prompt), corrected by
    ``lexicon`` when given."""
    out = []
    for _, text in noisy_texts(ex, cfg, index):
        if lexicon is not None:
            text = lexicon.correct(text)
        p = ex.noisy_prompt(lambda _, text=text: text)
        if p is not None:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------- model parts
@dataclass
class Parts:
    """The pieces of a decoder-only causal LM the loop calls directly (Llama-style transformers models)."""

    embed: Any
    layers: Any
    norm: Any
    rotary: Any
    head: Any

    @classmethod
    def of(cls, model: Any) -> Parts:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        dec = base.get_decoder()
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(dec, attr):
                raise ValueError(f"tuning needs a Llama-style decoder (embed_tokens, layers, norm, rotary_emb); "
                                 f"{type(dec).__name__} has no {attr!r}")
        return cls(dec.embed_tokens, dec.layers, dec.norm, dec.rotary_emb, base.get_output_embeddings())


def _segments(row: int | Sequence[int]) -> Sequence[int]:
    return (row,) if isinstance(row, int) else row


def _layout(rows: Sequence[int | Sequence[int]], width: int, device: torch.device, past: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids [B, T] (-1: padding) and position ids [B, T] of rows that each hold one sequence (an int:
    its length) or several packed one after another (their lengths)."""
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.arange(past, past + width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        o = 0
        for s, m in enumerate(_segments(row)):
            seg[r, o: o + m] = s
            pos[r, o: o + m] = torch.arange(past, past + m)
            o += m
    return seg.to(device), pos.to(device)


def _mask(seg: torch.Tensor, dtype: torch.dtype, past: int = 0) -> torch.Tensor:
    """Additive [B, 1, T, past + T] mask: the ``past`` shared positions are always visible, the rest causal
    within each packed sequence, so no sequence sees another or the padding (a padding position sees only
    padding, so no softmax row is empty)."""
    b, width = seg.shape
    idx = torch.arange(width, device=seg.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    if past:
        allowed = torch.cat([allowed.new_ones((b, width, past)), allowed], 2)
    m = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[:, None]


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens (first fit, longest first; an
    input longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, free in enumerate(room) if free >= lengths[j]), None)
        if r is None:
            rows.append([])
            room.append(max(capacity, lengths[j]))
            r = len(rows) - 1
        rows[r].append(j)
        room[r] -= lengths[j]
    return rows


PACK_TOKENS = 128  # tokens per packed row through the trained layers (Trainer._logits)


class SharedHead:
    """Keys and values of a token prefix every sequence starts with (a prompt template's head), computed once.

    It stands in for a transformers cache in the decoder layers' attention (``update`` is all they call): while
    recording it keeps each layer's keys and values of the head; afterwards it prepends them to every batch's, so
    a batch of suffixes attends to the head exactly as the whole sequences would.
    """

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.kv[layer_idx] = (key, value)
            return key, value
        hk, hv = self.kv[layer_idx]
        b = key.shape[0]
        return torch.cat([hk.expand(b, -1, -1, -1), key], 2), torch.cat([hv.expand(b, -1, -1, -1), value], 2)


def _cache_kwarg(layer: Any) -> str:
    """transformers renamed the decoder layer's cache argument (``past_key_values`` -> ``cache``)."""
    return "cache" if "cache" in inspect.signature(type(layer).forward).parameters else "past_key_values"


def run_layers(parts: Parts, h: torch.Tensor, lengths: Sequence[int | Sequence[int]], start: int,
               stop: int | None = None, *, head: SharedHead | None = None) -> torch.Tensor:
    """Right-padded hidden states ``h`` [B, T, D] through ``layers[start:stop]``; ``lengths`` has per row the
    length of its sequence, or of the sequences packed in it (each attends only to itself, positions restart).
    With a recorded ``head``, every sequence continues it (positions start after it and attention sees it);
    with one still recording, ``h`` is the head itself (batch 1) and its keys and values are kept."""
    b, t, _ = h.shape
    past = head.length if head is not None and not head.recording else 0
    seg, pos = _layout(lengths, t, h.device, past)
    pe = parts.rotary(h, pos)
    mask = _mask(seg, h.dtype, past)
    for layer in parts.layers[start:stop]:
        extra = {_cache_kwarg(layer): head} if head is not None else {}
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, **extra)
        h = out[0] if isinstance(out, tuple) else out
    if head is not None and head.recording:
        head.length, head.recording = t, False
    return h


def pad_right(seqs: Sequence[torch.Tensor]) -> torch.Tensor:
    width = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros((len(seqs), width, *seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """Steps, loss and ETA: a bar on a terminal, a JSON line every ~5% otherwise (Ray job logs)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, start: int = 0) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.t0 = time.time()
        self.start = self.done = start  # a resumed run starts part-way; the ETA counts this run's pace only
        self.bar = None
        self.every = max(1, total // 20)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, **info: float) -> None:
        if not self.enabled:
            return
        last, self.done = self.done, step
        elapsed = time.time() - self.t0
        if self.bar is not None:
            self.bar.update(step - last)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
        elif step // self.every > last // self.every or step == self.total:
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            print(json.dumps({"event": self.desc, "step": step, "total": self.total, "elapsed_s": round(elapsed, 1),
                              "eta_s": round(eta, 1), **{k: round(v, 5) for k, v in info.items()}}),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    trainable_params: int
    layers: list[int]
    layer_scores: dict[int, float]
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    frozen_pass: str = "none"  # precision of the one-time pass below the lowest tuned layer; 'none': no such pass
    denoise: dict[str, Any] | None = None  # the denoiser stage's record (tuning/denoise.py), when it ran


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def shared_head(encs: Sequence[Encoded]) -> tuple[int, ...]:
    """The longest token prefix all inputs share, ending before the last prompt token of each (the position that
    predicts the first completion token stays an input's own)."""
    if not encs:
        return ()
    first, n = encs[0].ids, min(e.n_prompt for e in encs) - 1
    for e in encs[1:]:
        n = next((j for j in range(n) if e.ids[j] != first[j]), n)
    return tuple(first[:max(n, 0)])


def frozen_bfloat16(setting: str, device: torch.device) -> bool:
    """Whether the frozen pass runs in bfloat16: 'auto' where the hardware computes it natively (a CUDA device
    that supports it; a CPU with AVX512-BF16 or AMX), where it is about twice as fast as float32."""
    if setting != "auto":
        return setting == "bfloat16"
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_factor(cfg: TuneConfig, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``, as a share of ``cfg.learning_rate``."""
    if cfg.lr_schedule == "constant":
        return 1.0
    warm = max(1, round(cfg.warmup_ratio * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


class Trainer:
    """Trains ``model`` in place (a PEFT model for 'lora', the bare model for 'full') on encoded examples.

    With ``lexicon`` every input (clean and corrupted) is what the gateway would hand the model behind that
    lexicon: the strength choice scores validation data that way, and so does training with
    ``robust.corrected_copies``. A corrupted copy that reads as its clean input (which the lexicon makes common)
    is skipped: its noisy pass would repeat the clean one."""

    def __init__(self, cfg: TuneConfig, model: Any, tokenizer: Any, train: Sequence[Example], *,
                 layers: list[int], layer_scores: dict[int, float] | None = None,
                 checkpoint_dir: Path | None = None, progress: bool = True,
                 lexicon: Lexicon | None = None) -> None:
        self.cfg, self.model, self.tok = cfg, model, tokenizer
        self.parts = Parts.of(model)
        self.layers = layers
        self.layer_scores = layer_scores or {}
        self.ckpt = checkpoint_dir
        self.progress = progress
        self.device = next(model.parameters()).device
        # the lowest layer with trainable weights: everything below it is frozen work
        self.start = 0 if cfg.method == "full" or not cfg.cache_frozen else min(layers)
        self.clean = [encode(tokenizer, served_prompt(e, lexicon), e.completion, cfg.max_length) for e in train]
        self.noisy: list[list[Encoded]] = []
        for i, e in enumerate(train):
            self.noisy.append([encode(tokenizer, p, e.completion, cfg.max_length)
                               for p in noisy_copies(e, cfg, i, lexicon)])
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.opt: torch.optim.Optimizer
        if cfg.method == "lora" and cfg.loraplus_ratio != 1.0:  # LoRA+: B learns `loraplus_ratio` times faster
            from peft.optimizers import create_loraplus_optimizer  # peft takes seconds to import: only when used

            self.opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.learning_rate,
                                                 loraplus_lr_ratio=cfg.loraplus_ratio,
                                                 loraplus_weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.learning_rate,
                                         weight_decay=cfg.weight_decay)
        for g in self.opt.param_groups:  # the schedule scales each group's own rate
            g["initial_lr"] = g["lr"]
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        # the token head every input shares (a prompt template's first line) goes through each layer once per
        # batch instead of once per input: once per run in the frozen layers, once per step in the trained ones
        self.head_ids = shared_head([e for es in ([self.clean] + self.noisy) for e in es])
        # the frozen pass runs in bfloat16 where the hardware has it natively (nothing trains there, so only the
        # forward's precision is at stake)
        self.frozen_bf16 = self.start > 0 and frozen_bfloat16(cfg.frozen_dtype, self.device)
        self.dtype = self.parts.embed.weight.dtype  # what the trained layers compute in
        self.frozen_pass = ("none" if self.start == 0 else "bfloat16" if self.frozen_bf16
                            else str(self.dtype).removeprefix("torch."))
        self._heads: dict[bool, tuple[SharedHead, torch.Tensor]] = {}
        if self.clean:
            self._self_check()

    @torch.no_grad()
    def _self_check(self) -> None:
        """The loop drives the decoder layers itself (that is what lets it skip frozen work); refuse a model
        whose own forward does something else (embedding scales, sliding windows, logit caps...). The frozen
        pass is checked in full precision, with the shared head."""
        was = self.model.training
        self.model.eval()
        try:
            e = self.clean[0]
            ref = self.model(input_ids=torch.tensor([e.ids], device=self.device)).logits[0].float()
            ref = ref[e.n_prompt - 1: len(e.ids) - 1]
            mine, _ = self._logits([(0, 0)], exact=True)
        finally:
            self.model.train(was)
        tol = 1e-3 if mine.dtype == torch.float32 and next(self.model.parameters()).dtype == torch.float32 else 5e-2
        if not torch.allclose(mine, ref, atol=tol, rtol=tol):
            arch = getattr(getattr(self.model, "config", None), "model_type", type(self.model).__name__)
            raise ValueError(f"the tuning loop supports Llama-style decoders; for model type {arch!r} its layer-by-"
                             f"layer forward differs from the model's own (max |diff| "
                             f"{float((mine - ref).abs().max()):.3g}), so it would train the wrong function")

    # ---- frozen prefix
    def _precision(self, exact: bool) -> contextlib.AbstractContextManager[Any]:
        if self.frozen_bf16 and not exact:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _head(self, exact: bool) -> tuple[SharedHead, torch.Tensor]:
        """The shared head's keys/values in the frozen layers, and its hidden states entering layer ``start``
        [1, n, D] (computed once per precision)."""
        ids = torch.tensor([self.head_ids], device=self.device)
        if exact not in self._heads:
            head = SharedHead()
            with self._precision(exact):
                h = run_layers(self.parts, self.parts.embed(ids), [len(self.head_ids)], 0, self.start, head=head)
            self._heads[exact] = (head, h.to(self.dtype))
        return self._heads[exact]

    @torch.no_grad()
    def _frozen(self, encs: Sequence[Encoded], exact: bool = False) -> list[torch.Tensor]:
        """Hidden states entering layer ``start`` (the model's dtype, unpadded) of the inputs' own tokens (after
        the head)."""
        n = len(self.head_ids)
        head = self._head(exact)[0] if n else None
        ids = pad_right([torch.tensor(e.ids[n:], device=self.device) for e in encs])
        lengths = [len(e.ids) - n for e in encs]
        with self._precision(exact):
            h = run_layers(self.parts, self.parts.embed(ids), lengths, 0, self.start, head=head)
        return [row[:m].to(self.dtype).clone() for row, m in zip(h, lengths)]

    def _prefix(self, keys: list[tuple[int, int]], progress: bool = False) -> list[torch.Tensor]:
        """Hidden states entering layer ``start`` for (example, variant) keys; variant 0 is clean."""
        # similar lengths together: right padding is wasted work in the 20-odd layers below
        missing = sorted((k for k in set(keys) if k not in self._cache), key=lambda k: len(self._enc(k).ids))
        prog = Progress(len(missing), "frozen-prefix", progress and self.progress)
        for i in range(0, len(missing), self.cfg.eval_batch_size):
            chunk = missing[i: i + self.cfg.eval_batch_size]
            prog.update(i + len(chunk))
            for k, row in zip(chunk, self._frozen([self._enc(k) for k in chunk])):
                self._cache[k] = row
        prog.close()
        return [self._cache[k] for k in keys]

    def _enc(self, key: tuple[int, int]) -> Encoded:
        i, v = key
        return self.clean[i] if v == 0 else self.noisy[i][v - 1]

    def _head_kv(self, exact: bool) -> SharedHead | None:
        """The shared head through the trained layers (batch 1, once per call of :meth:`_logits`, whatever the
        number of rows that attend to it)."""
        n = len(self.head_ids)
        if not n:
            return None
        head = SharedHead()
        ids = torch.tensor([self.head_ids], device=self.device)
        hh = self.parts.embed(ids) if self.start == 0 else self._head(exact)[1]
        run_layers(self.parts, hh, [n], self.start, head=head)
        return head

    def _hidden(self, keys: list[tuple[int, int]], head: SharedHead | None, exact: bool = False
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Final hidden states [R, T, D] of the inputs' own tokens (after the shared head of ``n`` tokens),
        packed into rows of about :data:`PACK_TOKENS` tokens, and where each input starts (row, offset)."""
        encs = [self._enc(k) for k in keys]
        n = len(self.head_ids)
        lengths = [len(e.ids) - n for e in encs]
        rows = pack(lengths, PACK_TOKENS)
        where: list[tuple[int, int]] = [(0, 0)] * len(keys)
        for r, members in enumerate(rows):
            o = 0
            for j in members:
                where[j] = (r, o)
                o += lengths[j]
        if self.start == 0:  # one embedding call: each call's backward makes a vocabulary-sized gradient
            h0 = self.parts.embed(pad_right([torch.tensor([t for j in members for t in encs[j].ids[n:]],
                                                          device=self.device) for members in rows]))
        else:
            own = self._frozen(encs, exact=True) if exact else self._prefix(keys)
            h0 = pad_right([torch.cat([own[j] for j in members]) for members in rows])
        h = run_layers(self.parts, h0, [tuple(lengths[j] for j in members) for members in rows], self.start,
                       head=head)
        return self.parts.norm(h), where

    def _logits(self, keys: list[tuple[int, int]], exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the positions that predict completion tokens, and those tokens (aligned, flattened, in the
        order of ``keys``).

        The inputs go through the trained layers packed end to end into rows (each attending only to itself
        and the shared head), so there is next to no padding: padded to one width, a batch of clean prompts and
        their corrupted copies (which tokenize longer, some much longer) was about half padding. Each input's
        logits do not depend on the others', so the result is the same as one padded batch's."""
        encs = [self._enc(k) for k in keys]
        n = len(self.head_ids)
        h, where = self._hidden(keys, self._head_kv(exact), exact)
        rr = [r for (r, o), e in zip(where, encs) for _ in range(e.n_prompt, len(e.ids))]
        tt = [o + t - 1 - n for (r, o), e in zip(where, encs) for t in range(e.n_prompt, len(e.ids))]
        targets = [t for e in encs for t in e.ids[e.n_prompt:]]
        rows = h[torch.tensor(rr, device=self.device), torch.tensor(tt, device=self.device)]
        return self.parts.head(rows).float(), torch.tensor(targets, device=self.device)

    def noisy_variant(self, i: int, epoch: int) -> int:
        """The variant key of the noisy copy example ``i`` trains on in ``epoch`` (it has at least one)."""
        return 1 + epoch % len(self.noisy[i])

    def same_as_clean(self, i: int, v: int) -> bool:
        """Whether variant ``v`` of example ``i`` is a copy that tokenizes as the clean input."""
        return v > 0 and self.noisy[i][v - 1].ids == self.clean[i].ids

    @torch.no_grad()
    def worst_variants(self, examples: list[int]) -> dict[int, int]:
        """For each example, the noisy copy with the highest completion loss under the current weights (in the
        training precision: a bfloat16 ranking was 18% faster on 2 cores but did worse on CLINC150's val split)."""
        keys = [(i, v) for i in examples for v in range(1, len(self.noisy[i]) + 1)]
        logits, target = self._logits(keys)
        ce = F.cross_entropy(logits, target, reduction="none")
        counts = [len(self._enc(k).ids) - self._enc(k).n_prompt for k in keys]
        best: dict[int, tuple[float, int]] = {}
        for (i, v), part in zip(keys, torch.split(ce, counts)):
            s = float(part.sum())
            if i not in best or s > best[i][0]:
                best[i] = (s, v)
        return {i: v for i, (_, v) in best.items()}

    def loss(self, batch: list[int], epoch: int) -> torch.Tensor:
        rc = self.cfg.robust
        noisy = [i for i in batch if self.noisy[i]] if rc is not None else []
        variant = {i: self.noisy_variant(i, epoch) for i in noisy}
        if rc is not None and rc.worst_of and rc.copies > 1 and noisy:
            variant = self.worst_variants(noisy)
        noisy = [i for i in noisy if not self.same_as_clean(i, variant[i])]
        # clean inputs and this epoch's noisy copies in one pass through the trained layers
        keys = [(i, 0) for i in batch] + [(i, variant[i]) for i in noisy]
        all_logits, all_target = self._logits(keys)
        n_clean = sum(len(self.clean[i].ids) - self.clean[i].n_prompt for i in batch)
        logits, target = all_logits[:n_clean], all_target[:n_clean]
        loss = F.cross_entropy(logits, target)
        if rc is not None and noisy:
            n_logits, n_target = all_logits[n_clean:], all_target[n_clean:]
            loss = loss + F.cross_entropy(n_logits, n_target)
            if rc.consistency_weight > 0:
                # KL(clean || noisy) over the same completion tokens; the clean prediction is the teacher
                sel = torch.cat([torch.full((len(self.clean[i].ids) - self.clean[i].n_prompt,), i in noisy)
                                 for i in batch]).to(self.device)
                teacher = F.log_softmax(logits[sel].detach(), -1)
                kl = F.kl_div(F.log_softmax(n_logits, -1), teacher, log_target=True, reduction="batchmean")
                loss = loss + rc.consistency_weight * kl
        return loss

    @torch.no_grad()
    def mean_loss(self, variant: int = 0) -> float:
        """Mean completion cross-entropy over all examples, clean (0) or their first noisy copy (1); examples
        without a noisy copy count clean. Cheap: the frozen prefix is cached, no generation."""
        total, count = 0.0, 0
        bs = self.cfg.eval_batch_size
        for i in range(0, len(self.clean), bs):
            keys = [(j, variant if variant and self.noisy[j] and not self.same_as_clean(j, variant) else 0)
                    for j in range(i, min(i + bs, len(self.clean)))]
            logits, target = self._logits(keys)
            total += float(F.cross_entropy(logits, target, reduction="sum"))
            count += len(target)
        return total / max(count, 1)

    # ---- checkpoints
    def _save(self, step: int, losses: list[float]) -> None:
        if self.ckpt is None:
            return
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(tmp / "weights.safetensors"))
        moments, steps = {}, {}
        for n, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                moments[f"exp_avg/{n}"] = st["exp_avg"].cpu().contiguous()
                moments[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].cpu().contiguous()
                steps[n] = float(st["step"])
        if moments:
            save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "optimizer_steps": steps,
                                                    "config": self.cfg.fingerprint(),
                                                    "frozen_bf16": self.frozen_bf16}))
        old = self.ckpt.with_name(self.ckpt.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt.exists():
            os.replace(self.ckpt, old)
        os.replace(tmp, self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self) -> tuple[int, list[float]]:
        if self.ckpt is None:
            return 0, []
        old = self.ckpt.with_name(self.ckpt.name + ".old")
        if not (self.ckpt / "state.json").is_file() and (old / "state.json").is_file():
            os.replace(old, self.ckpt)  # killed between the two renames of _save: the previous one is whole
        if not (self.ckpt / "state.json").is_file():
            return 0, []
        state = json.loads((self.ckpt / "state.json").read_text())
        # 'auto' precision resolves per machine: a run moved to other hardware must not mix the two
        if state.get("config") != self.cfg.fingerprint() or state.get("frozen_bf16", False) != self.frozen_bf16:
            log.warning("checkpoint at %s is from another configuration; starting over", self.ckpt)
            return 0, []
        weights = load_file(str(self.ckpt / "weights.safetensors"), device=str(self.device))
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
        if (self.ckpt / "optimizer.safetensors").is_file():
            moments = load_file(str(self.ckpt / "optimizer.safetensors"), device=str(self.device))
            for n, p in self.params.items():
                if f"exp_avg/{n}" in moments:
                    self.opt.state[p] = {"step": torch.tensor(state["optimizer_steps"][n]),
                                         "exp_avg": moments[f"exp_avg/{n}"],
                                         "exp_avg_sq": moments[f"exp_avg_sq/{n}"]}
        return int(state["step"]), list(state["losses"])

    def order(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng(self.cfg.seed * 7919 + epoch).permutation(len(self.clean)).tolist()
        bs = self.cfg.batch_size
        return [perm[i: i + bs] for i in range(0, len(perm), bs)]

    def train(self, *, stop_after: int | None = None,
              on_epoch: Callable[[int], None] | None = None) -> TrainResult:
        """Run (or resume) all epochs; ``stop_after`` ends early after that many steps (tests of resume)."""
        self.model.train(self.cfg.dropout > 0)  # without dropout, eval mode is the same maths
        per_epoch = len(self.order(0))
        total = per_epoch * self.cfg.epochs
        step, losses = self._restore()
        if self.start > 0:  # every input the rest of the run will see, through the frozen layers once, length-sorted
            # (noisy copies that only finished epochs, or no epoch at all, train on are skipped)
            left = range(step // per_epoch, self.cfg.epochs)
            every = self.cfg.robust is not None and self.cfg.robust.worst_of and self.cfg.robust.copies > 1
            self._prefix([(i, v) for i in range(len(self.clean))
                          for v in sorted({0} | ({*range(1, len(self.noisy[i]) + 1)} if every else
                                                 {self.noisy_variant(i, e) for e in left if self.noisy[i]}))
                          if not self.same_as_clean(i, v)],
                         progress=True)
        resumed = step
        t0 = time.time()
        prog = Progress(total, "tune", self.progress, start=step)
        torch.manual_seed(self.cfg.seed)
        for epoch in range(step // per_epoch, self.cfg.epochs):
            for b, batch in enumerate(self.order(epoch)):
                if epoch * per_epoch + b < step:
                    continue
                loss = self.loss(batch, epoch)
                for g in self.opt.param_groups:
                    g["lr"] = g["initial_lr"] * lr_factor(self.cfg, step, total)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                step += 1
                losses.append(float(loss.detach()))
                prog.update(step, loss=float(np.mean(losses[-per_epoch:])))
                if step % self.cfg.checkpoint_every == 0 or step == total:
                    self._save(step, losses)
                if stop_after is not None and step - resumed >= stop_after:
                    prog.close()
                    return self._result(step, time.time() - t0, losses, resumed)
            if on_epoch is not None:
                on_epoch(epoch)
        prog.close()
        self.model.eval()
        return self._result(step, time.time() - t0, losses, resumed)

    def _result(self, step: int, seconds: float, losses: list[float], resumed: int) -> TrainResult:
        n = sum(p.numel() for p in self.params.values())
        tail = losses[-max(1, len(losses) // 10):] if losses else [math.nan]
        return TrainResult(steps=step, seconds=seconds, final_loss=float(np.mean(tail)), trainable_params=n,
                           layers=self.layers, layer_scores=self.layer_scores, resumed_from=resumed,
                           losses=losses, peak_rss_mb=peak_rss_mb(), frozen_pass=self.frozen_pass)


# ---------------------------------------------------------------------------------------------- evaluation
def _batches(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, side: str
             ) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized batches padded on ``side`` (the tokenizer's own setting is restored afterwards)."""
    device = next(model.parameters()).device
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i: i + batch_size]), return_tensors="pt", padding=True)
            yield {k: v.to(device) for k, v in enc.items()}
    finally:
        tokenizer.padding_side = old


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
             ) -> list[str]:
    """Greedy completions (left-padded batches)."""
    outs: list[str] = []
    for enc in _batches(model, tokenizer, prompts, batch_size, "left"):
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def correct(outputs: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    """Exact match of the output's first lines, as many as the completion has, with the completion (each
    whitespace-trimmed): what follows a complete answer (another line the model went on with) does not count."""
    def lines(text: str) -> list[str]:
        return [line.strip() for line in text.strip().split("\n")]

    out = []
    for o, e in zip(outputs, examples):
        want = lines(e.completion)
        out.append(lines(o)[: len(want)] == want)
    return np.array(out)


def max_new_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    return 1 + max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples)


def evaluate(model: Any, tokenizer: Any, examples: Sequence[Example], *, family: str | None = None,
             severity: float = 0.3, seed: int = 0, batch_size: int = 32, lexicon: Lexicon | None = None
             ) -> np.ndarray:
    """Per-example correctness on clean prompts, or on prompts corrupted with ``family``; with ``lexicon``, of
    the model behind it (the user's words corrected as the gateway corrects them)."""
    def served(text: str) -> str:
        return lexicon.correct(text) if lexicon is not None else text

    prompts = []
    for i, e in enumerate(examples):
        p = e.noisy_prompt(lambda t, i=i: served(t if family is None else corrupt(t, family, severity, seed + i)))
        prompts.append(e.prompt if p is None else p)
    return correct(generate(model, tokenizer, prompts, max_new_tokens(tokenizer, examples), batch_size), examples)


@torch.no_grad()
def next_token_argmax(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
    """Teacher-forced argmax next token at every position of each text (for retained-behaviour checks)."""
    out = []
    for enc in _batches(model, tokenizer, texts, batch_size, "right"):
        am = model(**enc).logits.argmax(-1).cpu().numpy()
        for row, n in zip(am, enc["attention_mask"].sum(1).tolist()):
            out.append(row[:n])
    return out
