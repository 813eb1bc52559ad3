"""The batching engine: iteration-level (continuous) batching over one base model with mixed LoRA adapters.

:class:`EngineCore` is synchronous and single-threaded; every call to :meth:`EngineCore.step` runs one
iteration: admit waiting requests (loading their adapters if needed), prefill them together, merge them
into the running batch, then run one decode step for every running sequence. Sequences join and leave
between any two steps; each step emits at most one token per sequence to that request's sink, which is
what streaming consumes. :class:`AsyncEngine` runs the core on a thread of its own and exposes asyncio
streams, so the event loop that serves HTTP never waits on a forward pass.

The KV cache is one left-padded ``DynamicCache`` for the whole running batch; rows are added by padding both
sides to a common length and concatenating, removed by index selection, and fully padded columns on the
left are trimmed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tsugiki.adapters.cache import AdapterCache
from tsugiki.adapters.format import AdapterRef, LoraWeights, check_fits, read_lora_artifact
from tsugiki.adapters.store import AdapterStore
from tsugiki.config import AdapterConfig, EngineConfig
from tsugiki.errors import EngineError, InvalidRequestError, ModelNotFoundError, OverloadedError, TsugikiError
from tsugiki.serve.lora import MultiLoRALinear, inject_multi_lora
from tsugiki.serve.metrics import EngineMetrics
from tsugiki.serve.sampling import SamplingParams, make_generator, sample_rows
from tsugiki.serve.text import TextStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it. ``adapter`` is an adapter *name* (resolved to its active version at
    admission) or None; ``version`` pins an exact stored version instead (an alias routed the request to it)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: str | None = None
    version: AdapterRef | None = None


@dataclass
class TokenEvent:
    """One step's output for one request. ``finish_reason`` is set on the last event ('stop', 'length', 'abort')."""

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    adapter: AdapterRef | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    features: np.ndarray | None = None  # first event only: mean-pooled last hidden state of the prompt
    prompt_logprob: float | None = None  # first event only, sampled requests: mean log-prob of the prompt tokens


Sink = Callable[[TokenEvent | TsugikiError], None]


@dataclass
class _Seq:
    req: GenerationRequest
    sink: Sink
    ref: AdapterRef | None
    stream: TextStream
    generator: torch.Generator | None
    n_tokens: int  # real tokens in the KV cache + the pending one
    pending: int = -1  # sampled token not yet fed to the model
    generated: int = 0
    finished: str | None = None
    eos: frozenset[int] = field(default_factory=frozenset)
    features: np.ndarray | None = None
    prompt_logprob: float | None = None


class EngineCore:
    """Synchronous engine over one model. Not thread-safe: drive it from one thread.

    Args:
        model: a transformers causal LM (eval mode, on its device).
        tokenizer: its tokenizer.
        engine_cfg: batch and token limits.
        adapter_cfg: adapter rank/cache limits.
        store: where adapter names resolve to versions; None serves the bare base model only.
        max_model_len: longest prompt + completion.
        metrics: engine metrics (optional).
        capture_features: pool each prompt's last hidden state at prefill (the monitor's drift features), and
            for a sampled share of prompts (``engine_cfg.prompt_perplexity_sample``) score the prompt tokens
            with the LM head (prompt perplexity).
    """

    def __init__(self, model: Any, tokenizer: Any, *, engine_cfg: EngineConfig, adapter_cfg: AdapterConfig,
                 store: AdapterStore | None, max_model_len: int, base_name: str = "base",
                 metrics: EngineMetrics | None = None, capture_features: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = engine_cfg
        self.adapter_cfg = adapter_cfg
        self.store = store
        self.max_model_len = max_model_len
        self.base_name = base_name
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self._lora_batch, self.lora_layers = inject_multi_lora(model)
        # transformers renamed `past_key_values` to `cache` in 5.x; use whichever this version takes.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.shapes = {n: (m.in_features, m.out_features) for n, m in self.lora_layers.items()}
        self.cache = AdapterCache(adapter_cfg.max_loaded, self._evict)
        # Slots of the versions aliases route to (set by the server from the registry): kept resident like active
        # versions.
        self.routed: set[str] = set()
        self._waiting: deque[tuple[GenerationRequest, Sink]] = deque()
        self._rows: list[_Seq] = []
        self._kv: Any = None  # DynamicCache for self._rows
        self._attn = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        # requests to abort, by identity: ``request_id`` is the caller's (an ``x-request-id`` header can repeat), so
        # a client that disconnects must not take another request with the same id down with it
        self._aborted: list[GenerationRequest] = []
        self._admitted: list[_Seq] = []
        self._ppl_rng = random.Random(0)
        # Prompt features for the monitor come free from prefill: the decoder's last hidden states, captured by a
        # hook (no second forward pass) and mean-pooled over each prompt's real tokens.
        self._hidden: torch.Tensor | None = None
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self._capture = capture_features and decoder is not None
        if self._capture and decoder is not None:
            decoder.register_forward_hook(self._capture_hidden)
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self._eos = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def _capture_hidden(self, module: Any, args: Any, output: Any) -> None:
        if self._hidden is None:
            return  # only prefill asks for it
        hs = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
        if isinstance(hs, torch.Tensor):
            self._hidden = hs

    # ---- requests --------------------------------------------------------------------------------------------
    def add_request(self, req: GenerationRequest, sink: Sink) -> None:
        if len(self._waiting) >= self.cfg.max_waiting:
            raise OverloadedError(f"{len(self._waiting)} requests are already queued (engine.max_waiting); retry later")
        self._waiting.append((req, sink))
        self._gauge()

    def abort(self, req: GenerationRequest) -> None:
        """Stop ``req`` (this very request, whatever else shares its ``request_id``) at the next step."""
        self._aborted.append(req)

    def fail_all(self, err: TsugikiError) -> None:
        """Fail every running and waiting request with ``err`` and drop the batch (after a failed step),
        including those admitted by the failed step but not yet merged into the batch."""
        admitted = [s for s in self._admitted if not any(s is r for r in self._rows)]
        for s in self._rows + admitted:
            if s.ref is not None:
                self.cache.unpin(s.ref)
            s.sink(err)
        self._admitted = []
        while self._waiting:
            self._waiting.popleft()[1](err)
        self._rows, self._kv, self._attn = [], None, self._attn[:0, :0]

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- adapters --------------------------------------------------------------------------------------------
    def read_adapter(self, path: str, where: str) -> LoraWeights:
        """Read and validate an adapter against this base model (raises AdapterError with the reason)."""
        weights = read_lora_artifact(path, max_file_bytes=self.adapter_cfg.max_file_bytes)
        check_fits(weights, self.shapes, max_rank=self.adapter_cfg.max_rank, base_name=self.base_name, where=where)
        return weights

    def ensure_resident(self, ref: AdapterRef, weights: LoraWeights | None = None) -> bool:
        """Make ``ref`` servable on this replica; False when every cache slot is pinned by running work."""
        if ref in self.cache:
            self.cache.touch(ref)
            return True
        if not self.cache.has_room():
            return False
        t0 = time.perf_counter()
        if weights is None:
            assert self.store is not None
            weights = self.read_adapter(str(self.store.path_of(ref)), ref.key)
        self.cache.add(ref)  # first: it evicts to make room before the new weights take memory
        try:
            for name, (a, b) in weights.modules.items():
                self.lora_layers[name].add_adapter(ref.slot, a, b, weights.scaling[name])
        except BaseException:  # an out-of-memory part-way: not resident with some layers only
            self.cache.remove(ref)
            raise
        if self.metrics:
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - t0)
            self.metrics.adapters_loaded.set(len(self.cache))
        return True

    def _evict(self, ref: AdapterRef) -> None:
        for layer in self.lora_layers.values():
            layer.remove_adapter(ref.slot)
        if self.metrics:
            self.metrics.adapters_loaded.set(len(self.cache))

    def sync_store(self) -> None:
        """Drop resident versions the store no longer serves (unloaded or replaced) and no alias routes to
        (:attr:`routed`), unless in use."""
        if self.store is None:
            return
        keep = {r.slot for r in self.store.active_refs().values()} | self.routed
        for ref in self.cache.refs():
            if ref.slot not in keep and not self.cache.pinned(ref):
                self.cache.remove(ref)

    # ---- the loop --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: admit and prefill new sequences, decode one token for every running one."""
        self._drop_aborted()
        new = self._admit()
        if new:
            self._prefill(new)
        self._admitted = []
        if self._rows:
            self._decode()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._rows))

    def _drop_aborted(self) -> None:
        if not self._aborted:
            return
        def aborted(r: GenerationRequest) -> bool:
            return any(r is a for a in self._aborted)

        for s in self._rows:
            if aborted(s.req):
                s.finished = "abort"
        kept = deque((r, k) for r, k in self._waiting if not aborted(r))
        self._waiting = kept
        self._aborted.clear()
        self._retire()

    def _admit(self) -> list[_Seq]:
        # out of the queue, not yet in the batch: kept where fail_all finds them if this step fails from here on
        new: list[_Seq] = []
        self._admitted = new
        while self._waiting and len(self._rows) + len(new) < self.cfg.max_batch_size:
            req, sink = self._waiting[0]
            ref = None
            try:
                if req.version is not None or req.adapter is not None:
                    if self.store is None:
                        raise ModelNotFoundError(f"model {req.adapter!r} does not exist", param="model")
                    ref = req.version if req.version is not None else self.store.require(str(req.adapter))
                    if not self.ensure_resident(ref):
                        break  # every slot pinned: wait for running sequences to finish
            except TsugikiError as e:
                self._waiting.popleft()
                sink(e)
                continue
            self._waiting.popleft()
            try:
                seq = _Seq(req=req, sink=sink, ref=ref, stream=TextStream(self.tokenizer, req.params.stop),
                           generator=make_generator(req.params, self.device), n_tokens=len(req.prompt_ids),
                           eos=frozenset() if req.params.ignore_eos else self._eos)
            except Exception as e:  # settings the API let through but torch refuses: this request fails alone
                logger.warning("request refused at admission", extra={"request_id": req.request_id,
                                                                      "error": repr(e)})
                sink(InvalidRequestError(f"the request's sampling settings cannot be used: {e}"))
                continue
            if ref is not None:
                self.cache.pin(ref)
            new.append(seq)
        return new

    def _forward(self, input_ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor, kv: Any,
                 keys: list[str | None]) -> torch.Tensor:
        self._lora_batch.set(keys)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: kv})
        return out.logits[:, -1, :]

    def _prefill(self, new: list[_Seq]) -> None:
        from transformers import DynamicCache

        width = max(len(s.req.prompt_ids) for s in new)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(new), width), pad, dtype=torch.long)
        attn = torch.zeros((len(new), width), dtype=torch.long)
        for i, s in enumerate(new):
            n = len(s.req.prompt_ids)
            ids[i, width - n :] = torch.tensor(s.req.prompt_ids)
            attn[i, width - n :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        kv = DynamicCache()
        t0 = time.perf_counter()
        if self._capture:
            self._hidden = torch.empty(0)  # arm the hook
        logits = self._forward(ids, attn, positions, kv, [s.ref.slot if s.ref else None for s in new])
        hidden, self._hidden = self._hidden, None
        if hidden is not None and hidden.dim() == 3:
            mask = attn[:, :, None].to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy()
            for i, s in enumerate(new):
                s.features = pooled[i]
            self._prompt_logprobs(new, hidden, ids, attn)
        if self.metrics:
            self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        self._merge(new, kv, attn)
        self._emit(new, logits)

    @torch.no_grad()
    def _prompt_logprobs(self, new: list[_Seq], hidden: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor) -> None:
        """Mean log-probability of each sampled prompt's tokens given their prefixes, from the captured hidden
        states (the LM head over the prompt positions; no second forward pass)."""
        rate = self.cfg.prompt_perplexity_sample
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if rate <= 0 or head is None:
            return
        for i, s in enumerate(new):
            n = len(s.req.prompt_ids)
            if n < 2 or self._ppl_rng.random() >= rate:
                continue
            h = hidden[i, hidden.shape[1] - n : -1]
            logp = torch.log_softmax(head(h).float(), dim=-1)
            target = ids[i, ids.shape[1] - n + 1 :].to(logp.device)
            s.prompt_logprob = float(logp.gather(-1, target[:, None]).mean())

    def _merge(self, new: list[_Seq], kv: Any, attn: torch.Tensor) -> None:
        if self._kv is None or not self._rows:
            self._rows, self._kv, self._attn = list(new), kv, attn
            return
        old_w, new_w = self._attn.shape[1], attn.shape[1]
        width = max(old_w, new_w)

        def lpad(t: torch.Tensor, w: int) -> torch.Tensor:
            if t.shape[-2 if t.dim() == 4 else -1] == w:
                return t
            if t.dim() == 4:  # [B, H, T, D]
                z = t.new_zeros(t.shape[0], t.shape[1], w - t.shape[2], t.shape[3])
                return torch.cat([z, t], dim=2)
            return torch.cat([t.new_zeros(t.shape[0], w - t.shape[1]), t], dim=1)

        for old_layer, new_layer in zip(self._kv.layers, kv.layers):
            old_layer.keys = torch.cat([lpad(old_layer.keys, width), lpad(new_layer.keys, width)])
            old_layer.values = torch.cat([lpad(old_layer.values, width), lpad(new_layer.values, width)])
        self._attn = torch.cat([lpad(self._attn, width), lpad(attn, width)])
        self._rows.extend(new)

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=self.device)
        attn = torch.cat([self._attn, self._attn.new_ones(len(rows), 1)], dim=1)
        positions = torch.tensor([[s.n_tokens] for s in rows], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        logits = self._forward(ids, attn, positions, self._kv, [s.ref.slot if s.ref else None for s in rows])
        if self.metrics:
            self.metrics.batch_size.observe(len(rows))
            self.metrics.decode_seconds.observe(time.perf_counter() - t0)
        self._attn = attn
        for s in rows:
            s.n_tokens += 1
        self._emit(rows, logits)

    def _emit(self, rows: list[_Seq], logits: torch.Tensor) -> None:
        sampled = sample_rows(logits, [s.req.params for s in rows], [s.generator for s in rows])
        for s, out in zip(rows, sampled):
            s.pending = out.token_id
            s.generated += 1
            finish = None
            if out.token_id in s.eos:
                finish = "stop"
                text = s.stream.flush()
            else:
                text = s.stream.push(out.token_id)
                if s.stream.stopped:
                    finish = "stop"
                elif s.generated >= s.req.params.max_tokens or s.n_tokens + 1 >= self.max_model_len:
                    finish = "length"
                    text += s.stream.flush()
            s.finished = finish
            s.sink(TokenEvent(request_id=s.req.request_id, token_id=out.token_id, text=text, logprob=out.logprob,
                              top_logprobs=out.top, finish_reason=finish, adapter=s.ref,
                              prompt_tokens=len(s.req.prompt_ids), completion_tokens=s.generated,
                              features=s.features if s.generated == 1 else None,
                              prompt_logprob=s.prompt_logprob if s.generated == 1 else None))
        self._retire()

    def _retire(self) -> None:
        done = [i for i, s in enumerate(self._rows) if s.finished]
        if not done:
            return
        for i in done:
            s = self._rows[i]
            if s.finished == "abort":
                s.sink(TokenEvent(request_id=s.req.request_id, token_id=None, text="", finish_reason="abort",
                                  adapter=s.ref, prompt_tokens=len(s.req.prompt_ids),
                                  completion_tokens=s.generated))
            if s.ref is not None:
                self.cache.unpin(s.ref)
        keep = [i for i in range(len(self._rows)) if i not in set(done)]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._kv, self._attn = None, self._attn[:0, :0]
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        attn = self._attn.index_select(0, idx)
        first = int((attn.sum(0) > 0).nonzero()[0]) if attn.numel() else 0  # leading all-padding columns
        self._attn = attn[:, first:]
        for layer in self._kv.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]


class AsyncEngine:
    """Runs an :class:`EngineCore` on a dedicated thread; asyncio callers submit work and stream tokens.

    Adapter loads and other state changes are executed on the engine thread between steps, so they never
    race with a forward pass.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tsugiki-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_sync = 0.0
        while not self._stopping:
            if time.monotonic() - last_sync > 1.0:  # pick up unloads and new versions made by other replicas
                last_sync = time.monotonic()
                try:
                    self.core.sync_store()
                except Exception:
                    logger.exception("adapter store sync failed")
            try:
                block = not self.core.has_work()
                while True:
                    fn = self._inbox.get(block=block, timeout=0.5 if block else None)
                    fn()
                    block = False
            except queue.Empty:
                pass
            if self.core.has_work():
                try:
                    self.core.step()
                except Exception:  # a bug in a step must not kill the replica: fail the running work
                    logger.exception("engine step failed; failing the running requests")
                    self.core.fail_all(EngineError("the engine failed while generating; the request was not "
                                                   "completed"))

    def call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the engine thread; await the returned future for its result or exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                res = fn()
            except BaseException as e:  # delivered to the awaiting caller
                loop.call_soon_threadsafe(_set_exc, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, res)

        self._inbox.put(run)
        return fut

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit ``req`` and yield its token events; raises TsugikiError for refused requests."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[TokenEvent | TsugikiError] = asyncio.Queue()

        def sink(ev: TokenEvent | TsugikiError) -> None:
            loop.call_soon_threadsafe(out.put_nowait, ev)

        finished = False
        try:
            # inside the try: a caller cancelled while the request is being queued still aborts it
            await self.call(lambda: self.core.add_request(req, sink))
            while True:
                ev = await out.get()
                if isinstance(ev, TsugikiError):
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away (client disconnect): free the slot
                self._inbox.put(lambda: self.core.abort(req))

    def shutdown(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)


def _set_result(fut: asyncio.Future[Any], res: Any) -> None:
    if not fut.done():
        fut.set_result(res)


def _set_exc(fut: asyncio.Future[Any], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


__all__ = ["EngineCore", "AsyncEngine", "GenerationRequest", "TokenEvent", "SamplingParams", "MultiLoRALinear"]
