"""Decode throughput of one batch over many LoRA adapters, as a ratio to the bare base model in the same run.

Variants (8 requests, equal-length prompts, greedy, ``--new-tokens`` tokens each, EOS ignored):

* ``tsugiki base``   EngineCore, every request on the bare base model (adapter=None), all admitted together.
* ``tsugiki mixed``  the same EngineCore, each request on a different adapter (resolved by name from an
                     AdapterStore, resident before timing).
* ``hf base``        transformers ``generate`` on a fresh, unwrapped copy of the base model (left-padded batch).
* ``peft mixed``     a PeftModel holding the adapters, ``generate(..., adapter_names=[...])``.
* ``naive switch``   the same PeftModel, ``set_adapter(name)`` then batch-1 ``generate`` per request, in turn.

Two rates per variant: ``e2e`` = all generated tokens / wall time of the whole call (prefill included) and
``decode`` = tokens produced by decode forward passes / their time (timed from the end of the first engine
step, or from the first logits-processor call in HF generate, so prefill is excluded). Every round runs every
variant once, in a rotated order; the reported numbers are medians over rounds, and ratios are computed per
round against ``tsugiki base`` (or ``hf base``) of that round, then the median is taken. A measurement during
which other processes used more than ``--max-foreign`` of the CPUs (shared machines) is re-run, up to
``--retries`` times; the table shows the median share of the CPUs other processes took.

Run: ``python benchmarks/multi_lora_throughput.py [--rounds 3] [--new-tokens 32] [--batch 8]``
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import torch


def build_prompts(tokenizer: Any, batch: int, prompt_len: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``prompt_len`` tokens (distinct texts, truncated)."""
    out = []
    for i in range(batch):
        text = C.DEFAULT_PROMPTS[i % len(C.DEFAULT_PROMPTS)]
        if i >= len(C.DEFAULT_PROMPTS):
            text = f"({i}) " + text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_len:
            raise SystemExit(f"prompt {i} has only {len(ids)} tokens; use --prompt-len <= {len(ids)}")
        out.append(list(ids[:prompt_len]))
    return out


# ---- tsugiki ---------------------------------------------------------------------------------------------------
def run_engine(core: Any, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
               tag: str) -> dict[str, Any]:
    from tsugiki.serve.engine import GenerationRequest
    from tsugiki.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    errors: list[Any] = []

    def sink_for(rid: str) -> Any:
        def sink(ev: Any) -> None:
            if not hasattr(ev, "token_id"):
                errors.append(ev)
                return
            if ev.token_id is not None:
                tokens[rid].append(ev.token_id)
            if ev.finish_reason is not None:
                finished[rid] = ev.finish_reason
        return sink

    rids = []
    for i, (ids, ad) in enumerate(zip(prompts, adapters)):
        rid = f"{tag}-{i}"
        rids.append(rid)
        tokens[rid] = []
        core.add_request(GenerationRequest(request_id=rid, prompt_ids=tuple(ids), params=params, adapter=ad),
                         sink_for(rid))
    t0 = time.perf_counter()
    core.step()  # admit + prefill + the first decode step
    running_after_first = core.num_running
    t1 = time.perf_counter()
    steps = 1
    while core.has_work():
        core.step()
        steps += 1
    t2 = time.perf_counter()
    if errors:
        raise RuntimeError(f"{tag}: engine refused requests: {errors}")
    n = len(prompts)
    got = [len(tokens[r]) for r in rids]
    if got != [new_tokens] * n or set(finished.values()) != {"length"}:
        raise RuntimeError(f"{tag}: expected {new_tokens} tokens per request, got {got}, finish {finished}")
    if running_after_first != n:
        raise RuntimeError(f"{tag}: only {running_after_first}/{n} requests were admitted in the first step")
    # The first step emits 2 tokens per sequence (prefill + one decode); each later step emits 1.
    decode_tokens = n * (new_tokens - 2)
    return {"e2e_tps": n * new_tokens / (t2 - t0), "decode_tps": decode_tokens / (t2 - t1) if t2 > t1 else float("nan"),
            "wall_s": t2 - t0, "first_step_s": t1 - t0, "steps": steps, "tokens": [tokens[r] for r in rids]}


# ---- transformers / PEFT ------------------------------------------------------------------------------------------
class _FirstLogits:
    """A logits processor that records when generate first produces logits (i.e. when prefill ended)."""

    def __init__(self) -> None:
        from transformers import LogitsProcessor

        outer = self

        class P(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if outer.t is None:
                    outer.t = time.perf_counter()
                return scores

        self.t: float | None = None
        self.proc = P()


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int,
                adapter_names: list[str] | None = None) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    timer = _FirstLogits()
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([timer.proc]),
                             **kwargs)
    t2 = time.perf_counter()
    gen = out[:, width:]
    if gen.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {gen.shape[1]} new tokens, expected {new_tokens}")
    t1 = timer.t or t0
    n = len(prompts)
    return {"e2e_tps": n * new_tokens / (t2 - t0), "decode_tps": n * (new_tokens - 1) / (t2 - t1),
            "wall_s": t2 - t0, "first_step_s": t1 - t0, "tokens": gen.tolist()}


def naive_switch(peft_model: Any, prompts: list[list[int]], names: list[str], new_tokens: int,
                 pad_id: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    decode_time = 0.0
    toks = []
    for p, name in zip(prompts, names):
        peft_model.set_adapter(name)
        r = hf_generate(peft_model, [p], new_tokens, pad_id)
        decode_time += r["wall_s"] - r["first_step_s"]
        toks.extend(r["tokens"])
    t2 = time.perf_counter()
    n = len(prompts)
    return {"e2e_tps": n * new_tokens / (t2 - t0), "decode_tps": n * (new_tokens - 1) / decode_time,
            "wall_s": t2 - t0, "first_step_s": float("nan"), "tokens": toks}


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def agreement(ours: list[int], theirs: list[int], eos: set[int]) -> str:
    """How far two greedy sequences agree: 'all', 'eos@k' (identical up to our first EOS at k; HF's
    min_new_tokens forbids EOS while ignore_eos lets the engine emit it and go on, so the runs may part there)
    or 'k' (they differ from position k on)."""
    k = first_divergence(ours, theirs)
    if k >= len(ours):
        return "all"
    first_eos = next((i for i, t in enumerate(ours) if t in eos), None)
    if first_eos is not None and k >= first_eos:
        return f"eos@{first_eos}"
    return str(k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="requests = distinct adapters (default 8)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per request (default 32)")
    ap.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt, all equal (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round (default 3)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--max-foreign", type=float, default=0.15,
                    help="re-run a measurement when other processes used more than this fraction of the CPUs")
    ap.add_argument("--retries", type=int, default=3, help="re-runs allowed per measurement (default 3)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow per-request switching variant")
    args = ap.parse_args()
    if args.new_tokens < 3:
        ap.error("--new-tokens must be at least 3")

    C.setup_threads()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tsugiki.adapters.store import AdapterStore
    from tsugiki.config import AdapterConfig, EngineConfig, ModelConfig
    from tsugiki.serve.base_model import load_base_model
    from tsugiki.serve.engine import EngineCore

    base_dir = C.default_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="tsugiki-bench-mlora-"))
    C.log(f"making {args.batch} rank-{args.rank} all-linear adapters under {tmp}")
    adapters = C.make_adapters(base_dir, tmp / "src", args.batch, r=args.rank, alpha=args.alpha, seed=1000)
    names = [n for n, _ in adapters]

    C.log("loading the base model for tsugiki (EngineCore wraps its linears in place)")
    loaded = load_base_model(ModelConfig(), progress=False)
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    store = AdapterStore(tmp / "store")
    for name, path in adapters:
        store.put(name, path)
    core = EngineCore(loaded.model, tok, engine_cfg=EngineConfig(), adapter_cfg=AdapterConfig(max_loaded=16),
                      store=store, max_model_len=loaded.info.max_model_len, base_name=loaded.info.name)

    C.log("loading a fresh base model copy for hf base, and another for the PeftModel")
    hf_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(peft_base, str(adapters[0][1]), adapter_name=names[0])
    for name, path in adapters[1:]:
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.eval()

    prompts = build_prompts(tok, args.batch, args.prompt_len)
    n, nt = args.batch, args.new_tokens
    variants: dict[str, Any] = {
        "tsugiki base": lambda tag: run_engine(core, prompts, [None] * n, nt, tag),
        "tsugiki mixed": lambda tag: run_engine(core, prompts, list(names), nt, tag),
        "hf base": lambda tag: hf_generate(hf_model, prompts, nt, pad_id),
        "peft mixed": lambda tag: hf_generate(peft_model, prompts, nt, pad_id, adapter_names=list(names)),
    }
    if not args.skip_naive:
        variants["naive switch"] = lambda tag: naive_switch(peft_model, prompts, names, nt, pad_id)
    order = list(variants)

    results: dict[str, list[dict[str, Any]]] = {v: [] for v in order}
    foreign: dict[str, list[float]] = {v: [] for v in order}
    reruns = 0
    total_rounds = args.rounds + 1
    for rnd in range(total_rounds):
        shift = rnd % len(order)
        this_order = order[shift:] + order[:shift]
        for v in this_order:
            tag = f"r{rnd}-{v.replace(' ', '_')}"
            r, fg, again = C.measured(functools.partial(variants[v], tag), max_foreign=args.max_foreign,
                                      retries=args.retries if rnd > 0 else 0, what=v)
            reruns += again
            C.log(f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {v:14s} e2e {r['e2e_tps']:7.1f} tok/s  "
                  f"decode {r['decode_tps']:7.1f} tok/s  wall {r['wall_s']:.2f}s  other-CPU {fg:.0%}")
            if rnd > 0:
                results[v].append(r)
                foreign[v].append(fg)
    resident = len(core.cache)

    # ---- sanity: adapters change the output; tsugiki agrees with PEFT ---------------------------------------------
    eos = set(core._eos)
    last = {v: results[v][-1]["tokens"] for v in order}
    agree_base = [agreement(a, b, eos) for a, b in zip(last["tsugiki base"], last["hf base"])]
    agree_mixed = [agreement(a, b, eos) for a, b in zip(last["tsugiki mixed"], last["peft mixed"])]
    mixed_vs_base = [first_divergence(a, b) for a, b in zip(last["tsugiki mixed"], last["tsugiki base"])]

    # ---- summary --------------------------------------------------------------------------------------------------
    def ratio_series(v: str, ref: str, key: str) -> list[float]:
        return [a[key] / b[key] for a, b in zip(results[v], results[ref])]

    summary: dict[str, Any] = {}
    rows = []
    for v in order:
        e2e = C.median([r["e2e_tps"] for r in results[v]])
        dec = C.median([r["decode_tps"] for r in results[v]])
        re2e = C.median(ratio_series(v, "tsugiki base", "e2e_tps"))
        rdec = C.median(ratio_series(v, "tsugiki base", "decode_tps"))
        hre2e = C.median(ratio_series(v, "hf base", "e2e_tps"))
        hrdec = C.median(ratio_series(v, "hf base", "decode_tps"))
        wall = C.median([r["wall_s"] for r in results[v]])
        fg = C.median(foreign[v])
        summary[v] = {"other_cpu": fg, "e2e_tps": e2e, "decode_tps": dec, "ratio_e2e_vs_tsugiki_base": re2e,
                      "ratio_decode_vs_tsugiki_base": rdec, "ratio_e2e_vs_hf_base": hre2e,
                      "ratio_decode_vs_hf_base": hrdec, "wall_s": wall,
                      "rounds_decode_tps": [round(r["decode_tps"], 2) for r in results[v]]}
        rows.append([v, e2e, dec, re2e, rdec, hre2e, hrdec, wall, f"{fg:.0%}"])
    C.print_table(f"multi-LoRA throughput: batch {n}, {n} distinct rank-{args.rank} all-linear adapters, prompt "
                  f"{args.prompt_len} tok, {nt} new tok, torch threads {torch.get_num_threads()}, "
                  f"median of {args.rounds} rounds",
                  ["variant", "e2e tok/s", "decode tok/s", "e2e x tsu-base", "decode x tsu-base",
                   "e2e x hf-base", "decode x hf-base", "wall s", "other CPU"], rows)
    bar = summary["tsugiki mixed"]["ratio_decode_vs_tsugiki_base"]
    print(f"\ntsugiki mixed / tsugiki base (decode): {bar:.3f}x  -> bar >= 0.75x: {'PASS' if bar >= 0.75 else 'FAIL'}")
    print(f"tsugiki mixed / tsugiki base (e2e):    {summary['tsugiki mixed']['ratio_e2e_vs_tsugiki_base']:.3f}x")
    print(f"peft mixed / hf base (decode):         {summary['peft mixed']['ratio_decode_vs_hf_base']:.3f}x")
    print(f"re-runs because other processes loaded the CPUs: {reruns}")
    print("sanity (last round; 'all' = identical, 'eos@k' = identical up to the engine's EOS at k, "
          "'k' = differ from token k):")
    print(f"  tsugiki base  vs hf base:    {agree_base}")
    print(f"  tsugiki mixed vs peft mixed: {agree_mixed}")
    print(f"  tsugiki mixed vs tsugiki base, first differing token (adapters must change output): {mixed_vs_base}")
    print(f"  adapters resident in the engine cache: {resident}")
    C.print_json({"benchmark": "multi_lora_throughput", "torch_threads": torch.get_num_threads(), "batch": n,
                  "new_tokens": nt, "prompt_len": args.prompt_len, "rank": args.rank, "alpha": args.alpha,
                  "rounds": args.rounds, "reruns": reruns, "variants": summary, "bar_ratio_decode": bar,
                  "bar_pass": bar >= 0.75,
                  "agree_tsugiki_base_vs_hf_base": agree_base, "agree_tsugiki_mixed_vs_peft_mixed": agree_mixed,
                  "tsugiki_mixed_vs_base_divergence": mixed_vs_base})
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
