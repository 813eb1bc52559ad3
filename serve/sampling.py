"""Per-row sampling: greedy, temperature and nucleus (top-p), seeded per request, with log-probabilities."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

# temperatures below this decode greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by a smaller one
# gives 0/0 = NaN at the top token, and torch.multinomial refuses the row
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature`` 0 (or below :data:`SAMPLING_EPS`) is greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class Sampled:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[Sampled]:
    """Pick one token per row of ``logits: [N, V]`` (float32) by each row's params."""
    logits = logits.float()
    out_ids = torch.argmax(logits, dim=-1)
    want_top = any(p.top_logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_top else None
    norm = torch.logsumexp(logits, dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        # shifted by the maximum first: a small temperature then gives -inf for every other token (the greedy
        # limit) instead of overflowing to inf - inf = NaN
        row = logits[i]
        probs = torch.softmax((row - row.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p  # always keeps the most likely token
            sorted_p = sorted_p * keep
            out_ids[i] = order[torch.multinomial(sorted_p, 1, generator=g)]
        else:
            out_ids[i] = torch.multinomial(probs, 1, generator=g)[0]
    # The chosen token's log-probability is always computed (it is the monitor's output confidence).
    chosen = (logits.gather(1, out_ids[:, None])[:, 0] - norm).tolist()
    ids = out_ids.tolist()
    result = []
    for i, p in enumerate(params):
        top = None
        if p.top_logprobs and logprobs is not None:
            v, ix = torch.topk(logprobs[i], p.top_logprobs)
            top = list(zip(ix.tolist(), v.tolist()))
        result.append(Sampled(ids[i], chosen[i], top))
    return result
