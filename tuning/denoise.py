"""Low-layer denoising: an optional first stage of the robust recipe.

Why: character noise (typos, OCR confusions, mojibake) changes how a word tokenizes, and a small model composes
subword pieces into words in its lowest layers. An adapter on the upper layers only sees what the frozen lower
layers made of the broken pieces, and on CLINC150 its heavy-typo accuracy stopped rising whatever the recipe
(more corrupted copies, consistency weight, rank, depth: benchmarks/tuning_recipes.py). This stage gives layers
``0..n-1`` a LoRA trained to undo the noise where it does its damage, with a local objective: backpropagation
runs through those ``n`` layers only, never through the layers above.

What it learns: for an input and a corrupted copy with the same words (families that edit characters inside
words, :data:`ALIGNABLE`), the copy's hidden states entering layer ``n`` at the token ending each word, and at
the prompt's tail after the user's text, should equal the clean input's in the **base** model; and the clean
input's own states should stay the base model's (so clean behaviour is kept). Distances are squared errors per
hidden dimension, scaled by that dimension's spread over the clean states (a few dimensions of a residual
stream are orders of magnitude larger than the rest). The second stage then trains the task layers on top with
the denoiser in place (its frozen pass includes it).

Measured (benchmarks/tuning_recipes.py, CLINC150 val split, 450 queries, strength 1.0): the default recipe's
heavy-typo drop is 0.127 and 0.133 (two seeds; clean 0.873 and 0.909); with this stage on layers 0-5 it is 0.109
after one epoch at 1e-3 and 0.102 after three at 3e-3 (clean 0.896, heavy typos 0.793, the best noisy accuracy
of any variant), with 4 layers 0.131. On the test split (benchmarks/tuning_eval.py --methods robust_denoise) that
did not carry over: drop 0.144 against the default's 0.151 (mojibake +7 points, code-switching +3, heavy typos
+1). The three epochs cost ~450 s on 2 cores, more than the rest of the run, so the stage is off by default
(``RobustConfig.denoise_layers``): a tested option, not a result.

It is representation alignment in the spirit of robust word recognition (Pruthi et al., 2019, "Combating
adversarial misspellings with robust word recognition"), done inside the model at the word level instead of as a
separate spelling corrector in front of it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tsugiki.tuning.config import TuneConfig
from tsugiki.tuning.data import LABEL_TEMPLATE, Example
from tsugiki.tuning.trainer import Encoded, Parts, Progress, SharedHead, noisy_texts, pad_right, run_layers, shared_head

log = logging.getLogger("tsugiki.tuning")

# families that edit characters inside words and keep the word count: a corrupted word still stands for its
# clean word (code-switching replaces words with unrelated ones; truncation and random unicode lose words)
ALIGNABLE = frozenset({"typos", "keyboard", "swap", "delete", "ocr", "casing", "repeat", "mojibake"})
TAIL = 3  # prompt tokens after the user's text that are aligned too (the label template's "\nIntent:")
BATCH = 48  # corrupted inputs per step


@dataclass(frozen=True)
class Pair:
    """A clean input and one corrupted copy, with the aligned positions (token indices) in each."""

    example: int
    noisy_ids: tuple[int, ...]
    clean_pos: tuple[int, ...]
    noisy_pos: tuple[int, ...]


def _words(text: str) -> list[str]:
    return [w for w in text.split(" ") if w]


def _text_start(ex: Example) -> int:
    return len(LABEL_TEMPLATE.partition("{text}")[0]) if ex.label is not None else 0


def word_ends(tokenizer: Any, ex: Example, text: str) -> tuple[list[int], list[int]] | None:
    """Token ids of ``ex``'s prompt with ``text`` as the user's words, and per word the index of the token that
    holds its last character, then the prompt's last :data:`TAIL` tokens when they come after the text. None
    when a word's end maps to no token (it cannot be aligned)."""
    prompt = ex.noisy_prompt(lambda _: text)
    if prompt is None:
        return None
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), enc["offset_mapping"]
    pos, c = [], _text_start(ex)  # special tokens' offsets are (0, 0) and never hold a character
    for w in text.split(" "):  # the corruption module's word split
        c += len(w)
        if w:
            t = next((j for j, (a, b) in enumerate(offs) if a <= c - 1 < b), None)
            if t is None:
                return None
            pos.append(t)
        c += 1
    end = _text_start(ex) + len(text)
    tail = [j for j in range(len(ids) - TAIL, len(ids)) if j >= 0 and offs[j][0] >= end]
    return ids, pos + tail


def pairs(tokenizer: Any, train: Sequence[Example], cfg: TuneConfig) -> tuple[list[tuple[int, ...]], list[Pair]]:
    """The clean inputs' token ids (by example index) and the alignable (clean, corrupted copy) pairs: the
    copies of :data:`ALIGNABLE` families (the same copies the second stage trains on) whose words and prompt
    tail line up with the clean input's."""
    clean: list[tuple[int, ...]] = []
    out = []
    for i, ex in enumerate(train):
        got = word_ends(tokenizer, ex, ex.text) if ex.text is not None else None
        if got is not None and len(got[0]) > cfg.max_length:
            got = None  # the second stage cuts such prompts from the left; their words are not aligned here
        clean.append(tuple(got[0]) if got else ())
        if got is None:
            continue
        ids, cpos = got
        n_words = len(_words(ex.text or ""))
        for fam, noisy in noisy_texts(ex, cfg, i):
            if fam not in ALIGNABLE or noisy == ex.text or len(_words(noisy)) != n_words:
                continue
            got_n = word_ends(tokenizer, ex, noisy)
            if got_n is None or len(got_n[1]) != len(cpos) or len(got_n[0]) > cfg.max_length:
                continue
            nids, npos = got_n
            if [ids[j] for j in cpos[n_words:]] != [nids[j] for j in npos[n_words:]]:  # the tails differ
                continue
            out.append(Pair(i, tuple(nids), tuple(cpos), tuple(npos)))
    return clean, out


@dataclass
class DenoiseResult:
    layers: list[int]
    pairs: int
    steps: int
    seconds: float
    loss_before: float  # scaled squared error of the corrupted copies' states, before and after training
    loss_after: float
    clean_loss: float  # the clean inputs' drift from the base model's states after training (0 before)
    params: int = 0  # LoRA weights trained
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def lora_params(model: Any, layers: Sequence[int]) -> dict[str, torch.nn.Parameter]:
    keep = {f".layers.{i}." for i in layers}
    return {n: p for n, p in model.named_parameters() if "lora_" in n and any(k in n for k in keep)}


class Denoiser:
    """Trains the LoRA weights of ``layers`` (``0..n-1``) of a PEFT ``model`` by alignment (module docstring)."""

    def __init__(self, cfg: TuneConfig, model: Any, tokenizer: Any, train: Sequence[Example], layers: list[int],
                 *, checkpoint_dir: Path | None = None, progress: bool = True,
                 aligned: tuple[list[tuple[int, ...]], list[Pair]] | None = None) -> None:
        """``aligned``: what :func:`pairs` returns for ``train``, when the caller already has it."""
        if layers != list(range(len(layers))):
            raise ValueError(f"the denoiser takes the lowest layers 0..n-1, got {layers}")
        self.cfg, self.model, self.layers = cfg, model, layers
        self.parts = Parts.of(model)
        self.device = next(model.parameters()).device
        self.ckpt, self.progress = checkpoint_dir, progress
        self.clean, self.pairs = aligned if aligned is not None else pairs(tokenizer, train, cfg)
        if not self.pairs:
            raise ValueError("no corrupted copy lines up with its clean input word by word: nothing to align")
        self.used = sorted({p.example for p in self.pairs})  # examples with at least one pair
        self.head = shared_head([Encoded(self.clean[i], len(self.clean[i])) for i in self.used]
                                + [Encoded(p.noisy_ids, len(p.noisy_ids)) for p in self.pairs])
        self.params = lora_params(model, layers)
        if not self.params:
            raise ValueError(f"the model has no LoRA weights in layers {layers}")

    # ---- forward through the denoised layers, the shared head once per call
    def _states(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Hidden states entering layer n [B, T, D] of whole sequences (position t is token t, the shared head's
        positions included), right-padded."""
        n = len(self.head)
        head = None
        hh = None
        if n:
            head = SharedHead()
            hh = run_layers(self.parts, self.parts.embed(torch.tensor([self.head], device=self.device)), [n], 0,
                            len(self.layers), head=head)
        ids = pad_right([torch.tensor(s[n:], device=self.device) for s in seqs])
        h = run_layers(self.parts, self.parts.embed(ids), [len(s) - n for s in seqs], 0, len(self.layers),
                       head=head)
        if hh is not None:
            h = torch.cat([hh.expand(h.shape[0], -1, -1), h], 1)
        return h

    @torch.no_grad()
    def _targets(self, examples: Sequence[int]) -> dict[int, torch.Tensor]:
        """The base model's (adapter off) clean states entering layer n, per example."""
        out = {}
        with self.model.disable_adapter():
            order = sorted(examples, key=lambda i: len(self.clean[i]))
            for b in range(0, len(order), 64):
                chunk = order[b: b + 64]
                h = self._states([self.clean[i] for i in chunk])
                for r, i in enumerate(chunk):
                    out[i] = h[r, : len(self.clean[i])].clone()
        return out

    def _loss(self, batch: Sequence[Pair], target: dict[int, torch.Tensor], scale: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled squared error of the corrupted copies' aligned states, and of their clean inputs' states."""
        hn = self._states([p.noisy_ids for p in batch])
        pred = torch.cat([hn[r, list(p.noisy_pos)] for r, p in enumerate(batch)])
        tgt = torch.cat([target[p.example][list(p.clean_pos)] for p in batch])
        noisy = (((pred - tgt) / scale) ** 2).mean()
        ex = sorted({p.example for p in batch})
        hc = self._states([self.clean[i] for i in ex])
        cpred = torch.cat([hc[r, : len(self.clean[i])] for r, i in enumerate(ex)])
        ctgt = torch.cat([target[i] for i in ex])
        return noisy, (((cpred - ctgt) / scale) ** 2).mean()

    @torch.no_grad()
    def _mean_loss(self, target: dict[int, torch.Tensor], scale: torch.Tensor, sample: Sequence[Pair]
                   ) -> tuple[float, float]:
        n, c = zip(*(self._loss(sample[b: b + BATCH], target, scale) for b in range(0, len(sample), BATCH)))
        return float(torch.stack(n).mean()), float(torch.stack(c).mean())

    # ---- checkpoint: the stage is short (minutes), so it is saved once, when done
    def _fingerprint(self) -> str:
        return self.cfg.fingerprint() + f"/denoise{len(self.layers)}"

    def _restore(self) -> dict[str, Any] | None:
        if self.ckpt is None or not (self.ckpt / "state.json").is_file():
            return None
        state = json.loads((self.ckpt / "state.json").read_text())
        if state.get("config") != self._fingerprint():
            return None
        weights = load_file(str(self.ckpt / "weights.safetensors"), device=str(self.device))
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
        return dict(state["result"])

    def _save(self, result: DenoiseResult) -> None:
        if self.ckpt is None:
            return
        self.ckpt.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()},
                  str(self.ckpt / "weights.safetensors"))
        # state.json last: a stage killed while saving is redone, never half-loaded
        (self.ckpt / "state.json").write_text(json.dumps({"config": self._fingerprint(), "result": result.to_dict()}))

    def train(self) -> DenoiseResult:
        """Train (or restore) the denoiser; its weights are left frozen (``requires_grad`` off) for the next stage."""
        rc = self.cfg.robust
        assert rc is not None
        done = self._restore()
        if done is not None:
            for p in self.params.values():
                p.requires_grad_(False)
            log.info("denoiser restored from %s", self.ckpt)
            return DenoiseResult(**{**done, "resumed": True})
        t0 = time.time()
        was = self.model.training
        self.model.eval()  # no dropout in the alignment; the targets are deterministic
        for p in self.params.values():
            p.requires_grad_(True)
        target = self._targets(self.used)
        allt = torch.cat([target[i] for i in self.used])
        scale = allt.float().std(0).clamp_min(1e-3).to(allt.dtype)
        rng = np.random.default_rng(self.cfg.seed)
        probe = [self.pairs[j] for j in rng.permutation(len(self.pairs))[:BATCH * 2]]
        before = self._mean_loss(target, scale, probe)[0]
        opt = torch.optim.AdamW(list(self.params.values()), lr=rc.denoise_lr, weight_decay=0.0)
        per_epoch = math.ceil(len(self.pairs) / BATCH)
        prog = Progress(per_epoch * rc.denoise_epochs, "denoise", self.progress)
        step = 0
        for _ in range(rc.denoise_epochs):
            perm = rng.permutation(len(self.pairs))
            for b in range(0, len(perm), BATCH):
                noisy, clean = self._loss([self.pairs[j] for j in perm[b: b + BATCH]], target, scale)
                opt.zero_grad(set_to_none=True)
                (noisy + clean).backward()
                opt.step()
                step += 1
                prog.update(step, noisy=float(noisy.detach()), clean=float(clean.detach()))
        prog.close()
        after, clean_after = self._mean_loss(target, scale, probe)
        for p in self.params.values():
            p.requires_grad_(False)
        self.model.train(was)
        result = DenoiseResult(layers=self.layers, pairs=len(self.pairs), steps=step, seconds=time.time() - t0,
                               loss_before=before, loss_after=after, clean_loss=clean_after,
                               params=sum(p.numel() for p in self.params.values()))
        self._save(result)
        log.info("denoiser on layers 0..%d: %s", len(self.layers) - 1, result.to_dict())
        return result


def denoise_layers(cfg: TuneConfig, task_layers: Sequence[int]) -> list[int]:
    """The layers the denoiser takes: ``0..n-1`` for ``robust.denoise_layers`` n, below the lowest task layer
    (none for full fine-tuning, without the robust recipe, or when the task layers start at 0)."""
    rc = cfg.robust
    if cfg.method != "lora" or rc is None or not rc.denoise_layers or not task_layers or rc.copies == 0:
        return []
    return list(range(min(rc.denoise_layers, min(task_layers))))
