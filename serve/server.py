"""The model server: one base model, its adapters and the engine, behind a plain async Python interface.

The Ray Serve model deployment is a thin shell over :class:`ModelServer` (see ``deployments.py``); tests and
benchmarks use it in-process. Everything that crosses a process boundary is a plain dict.

Generation protocol: :meth:`ModelServer.generate` takes a payload dict and yields event dicts. The first event
is ``{"type": "error", "error": {...}}`` (the request was refused; nothing else follows) or
``{"type": "start", "prompt_tokens", "adapter", "noise", "corrected_words"}`` (``noise``: the request's noise score
and reasons, or None with monitoring off; ``corrected_words``: how many of the user's words the adapter's lexicon
corrected before the model read them, see adapters/lexicon.py); then ``{"type": "token", ...}`` events, the
last one with a ``finish_reason`` and ``engine_seconds``. After the last event the request's observation goes to
the monitor's shipper.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest

from tsugiki.adapters.format import AdapterRef
from tsugiki.adapters.lexicon import Lexicon
from tsugiki.adapters.routing import AliasRouter
from tsugiki.adapters.store import AdapterStore, check_name, inside_roots
from tsugiki.config import Settings
from tsugiki.errors import (
    AdapterError,
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    TsugikiError,
)
from tsugiki.monitoring.metrics import RequestQualityMetrics
from tsugiki.monitoring.monitor import FeatureShipper, Observation
from tsugiki.monitoring.noise import NoiseDetector, NoiseReport
from tsugiki.monitoring.reference import ReferenceNotSet, ReferenceSink, reference_key, ship_reference
from tsugiki.serve.base_model import LoadedBaseModel, load_base_model, set_torch_threads
from tsugiki.serve.engine import AsyncEngine, EngineCore, GenerationRequest, TokenEvent
from tsugiki.serve.metrics import EngineMetrics
from tsugiki.serve.outcomes import OutcomeRecorder
from tsugiki.serve.sampling import SamplingParams
from tsugiki.tuning.data import label_prompt, text_of_label_prompt

logger = logging.getLogger(__name__)


class ControlPlane(Protocol):
    """What a model server needs from the controller (in-process, or a Ray deployment handle's calls)."""

    async def snapshot(self) -> dict[str, Any]: ...

    async def record_outcomes(self, rows: list[dict[str, Any]], captures: list[Any]) -> Any: ...


async def _no_aliases() -> dict[str, Any]:
    return {"aliases": [], "versions": {}}


def _routed_error(routed: _Routed, e: BaseException) -> TsugikiError:
    """The error a caller of an alias sees when the version it was routed to fails: the caller chose the alias,
    not the version, so a bad version (files missing, weights refused) is the server's fault (500), not a 400."""
    if isinstance(e, TsugikiError) and e.status >= 500:
        return e
    msg = e.message if isinstance(e, TsugikiError) else f"{type(e).__name__}: {e}"
    return EngineError(f"alias {routed.alias!r} routed this request to {routed.key}, which failed: {msg}; "
                       "the rollout controller sees the failure", code="routed_version_failed")


def _unit_hash(text: str) -> float:
    """A stable hash of ``text`` in [0, 1) (capture sampling must agree across replicas and restarts)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class _Routed:
    """Where one request goes: ``adapter`` (a name, or None for the base model) or an exact ``version`` an
    alias routed it to (``key``), plus the alias's shadow version and whether to capture it."""

    adapter: str | None
    version: AdapterRef | None = None
    alias: str | None = None
    active: AdapterRef | None = None  # the adapter's active version when routed by name (the engine re-resolves)
    key: str | None = None
    shadow: str | None = None
    capture: bool = False

    def outcome(self, request_id: str, *, ok: bool, latency_s: float, confidence: float | None = None,
                noisy: bool = False, output: str | None = None, shadow: bool = False,
                agree: bool | None = None) -> dict[str, Any]:
        """The outcome row of the served version, or with ``shadow`` of the shadow version's copy."""
        return {"request_id": request_id, "alias": self.alias, "version_key": self.shadow if shadow else self.key,
                "shadow": shadow, "ok": ok, "latency_s": latency_s, "confidence": confidence, "noisy": noisy,
                "agree": agree, "output": output}


REFERENCE_RETRY_S = 60.0  # a drift reference the monitor did not take is offered again after this long
LEXICON_CACHE = 16  # adapter versions whose lexicons a replica keeps parsed (a 75-intent task's: 7 MB, most of it
#                    the deletion index of its ~1,500 words and its ~21,000 known words; ~23,000 with English words)


class ModelServer:
    """Loads the base model and serves generation and adapter management for it.

    Args:
        settings: gateway settings (model, adapters, engine sections are used).
        progress: show a progress bar if the default model must be converted.
        registry: Prometheus registry for engine metrics (a fresh one by default).
        monitor_sink: ``await monitor_sink(observations)``: where drift features and noise flags go.
        monitor_reference: ``await monitor_reference(label, features, source, key, noise)``: sets an adapter's
            drift reference from the features (and the noise scores of the prompts) its directory ships (when it
            is loaded through the API, and when a version is first used on this replica; see
            monitoring/reference.py).
        control: the control plane (aliases, outcomes); None serves without aliases.
    """

    def __init__(self, settings: Settings, *, progress: bool = False, registry: CollectorRegistry | None = None,
                 loaded: LoadedBaseModel | None = None,
                 monitor_sink: Callable[[list[dict[str, Any]]], Awaitable[Any]] | None = None,
                 monitor_reference: ReferenceSink | None = None, control: ControlPlane | None = None) -> None:
        self.settings = settings
        self.torch_threads = set_torch_threads(settings.model.torch_threads)
        self.loaded = loaded or load_base_model(settings.model, progress=progress)
        self.tokenizer = self.loaded.tokenizer
        self.info = self.loaded.info
        self.store = AdapterStore(settings.store_dir())
        # lexicon correction is pure Python: it runs here, one request at a time, off the event loop and out of
        # the default pool (where adapter downloads wait on each other)
        self._lexicon_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lexicon")
        self.roots = settings.adapter_roots()
        self.registry = registry or CollectorRegistry()
        self.metrics = EngineMetrics(self.registry)
        self.core = EngineCore(self.loaded.model, self.tokenizer, engine_cfg=settings.engine,
                               adapter_cfg=settings.adapters, store=self.store, max_model_len=self.info.max_model_len,
                               base_name=self.info.name, metrics=self.metrics,
                               capture_features=settings.monitor.enabled)
        self.engine = AsyncEngine(self.core)
        self.created = int(time.time())
        # Monitoring: the noise score is computed in the request (tens of microseconds); drift features leave
        # through the shipper, in batches, off the request path.
        mcfg = settings.monitor
        self.monitoring = mcfg.enabled
        self.noise = NoiseDetector(mcfg.noise_thresholds, max_prompt_tokens=int(0.9 * self.info.max_model_len))
        self.quality = RequestQualityMetrics(self.registry)
        self.shipper = FeatureShipper(monitor_sink if mcfg.enabled else None, self.quality)
        self.monitor_reference = monitor_reference if mcfg.enabled else None
        self._references: dict[str, float] = {}  # version -> when to hand its drift reference over (again)
        # Aliases: the controller says which versions an alias routes to; outcomes of routed requests go back to
        # it (batched, off the request path) as rollout evidence. Without a controller there are no aliases.
        self.control = control
        self.router = AliasRouter(control.snapshot if control else _no_aliases,
                                  settings.open_artifacts() if control else None, self.store,
                                  refresh_s=settings.registry.refresh_s)
        self.outcomes = OutcomeRecorder(control.record_outcomes if control else None)
        self._tasks: set[asyncio.Task[Any]] = set()  # shadow requests, reference hand-overs: off the request path
        self._lexicons: OrderedDict[AdapterRef, Lexicon | None] = OrderedDict()  # version -> its lexicon (LRU)
        logger.info("model server ready", extra={"base_model": self.info.name, "threads": self.torch_threads})

    # ---- metadata ------------------------------------------------------------------------------------------------
    async def describe(self) -> dict[str, Any]:
        return {"base_model": self.info.name, "fingerprint": self.info.fingerprint,
                "max_model_len": self.info.max_model_len, "created": self.created,
                "adapters": self.store.to_json(), "torch_threads": self.torch_threads}

    async def list_adapters(self) -> list[dict[str, Any]]:
        return self.store.to_json()

    def metrics_text(self) -> str:
        return generate_latest(self.registry).decode()

    # ---- adapters ------------------------------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Validate ``path`` against the base model, store it as a new version of ``name`` and make it servable.

        The new version is installed on this replica at once, unless every cache slot is pinned by running
        requests; then (as on every other replica) it is read from the store when a request first uses it.
        """
        check_name(name)
        if name == self.info.name:
            raise InvalidRequestError(f"adapter name {name!r} is the base model's name; choose another", param="name")
        real = inside_roots(path, self.roots)

        def read_and_store() -> Any:
            weights = self.core.read_adapter(str(real), repr(name))
            lexicon = Lexicon.load(real)  # a broken lexicon is refused here, with the fix, not at first use
            ref = self.store.put(name, real)
            return weights, ref, lexicon

        weights, ref, lexicon = await asyncio.to_thread(read_and_store)
        self._remember_lexicon(ref, lexicon)

        def install() -> None:
            self.core.sync_store()  # drop the replaced version (unless running sequences still use it)
            self.core.ensure_resident(ref, weights)

        await self.engine.call(install)
        rec = next(r for r in self.store.to_json() if r["name"] == name)
        # its tuning data's features, when it ships them, become its drift reference (monitoring/reference.py)
        rec["drift_reference"] = await self._ship_reference(name, ref, again=True)
        return rec

    async def _ship_reference(self, label: str, ref: AdapterRef, *, again: bool = False) -> str | None:
        """Hand the drift reference that stored version ``ref`` ships to the monitor as ``label``'s, once per
        version on this replica unless ``again`` (the monitor keeps the first copy it gets of a version's). When
        the monitor does not take it, a request a minute later tries again."""
        key = reference_key(ref)
        if self.monitor_reference is None or not (again or self._wants_reference(ref)):
            return None
        self._references[key] = time.monotonic() + REFERENCE_RETRY_S  # one attempt at a time
        try:
            source = await ship_reference(self.store.path_of(ref), label, self.monitor_reference, key=key,
                                          base_fingerprint=self.info.fingerprint, dtype=str(self.loaded.model.dtype),
                                          dim=self.loaded.model.config.hidden_size,
                                          noise=self.noise if self.monitoring else None)
        except ReferenceNotSet:
            return None
        self._references[key] = math.inf  # handed over, or there is none to hand over
        return source

    def _wants_reference(self, ref: AdapterRef) -> bool:
        return self.monitor_reference is not None and self._references.get(reference_key(ref), 0.0) < time.monotonic()

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        ref = await asyncio.to_thread(self.store.deactivate, name)
        await self.engine.call(self.core.sync_store)
        return {"name": ref.name, "version": ref.version, "digest": ref.digest, "active": False}

    # ---- word recognition ----------------------------------------------------------------------------------------
    def _remember_lexicon(self, ref: AdapterRef, lexicon: Lexicon | None) -> None:
        self._lexicons[ref] = lexicon
        self._lexicons.move_to_end(ref)
        while len(self._lexicons) > LEXICON_CACHE:
            self._lexicons.popitem(last=False)

    async def _lexicon(self, routed: _Routed) -> Lexicon | None:
        """The lexicon the routed adapter version ships (None: the base model, or a version without one). Read
        from the store once per version (off the event loop); a lexicon that cannot be read serves without word
        recognition and says so in the log, since the weights themselves are fine."""
        ref = routed.version or routed.active
        if ref is None:
            return None
        if ref in self._lexicons:
            self._lexicons.move_to_end(ref)
            return self._lexicons[ref]
        try:
            lexicon = await asyncio.to_thread(Lexicon.load, self.store.path_of(ref))
        except (AdapterError, OSError) as e:
            logger.warning("adapter lexicon unusable; serving without word recognition",
                           extra={"adapter": ref.key, "error": str(e)})
            lexicon = None
        self._remember_lexicon(ref, lexicon)
        return lexicon

    @staticmethod
    def _recognised(payload: dict[str, Any], lexicon: Lexicon | None, max_words: int
                    ) -> tuple[dict[str, Any], int]:
        """The payload with the user's words corrected by ``lexicon`` (the user messages of a chat; the text inside
        a label-template prompt, or the whole prompt), and how many words changed. Token-id prompts and the
        template's own words are left alone, and so is a text of more than ``max_words`` words: each word is a
        token at least, so it cannot fit the context (the length check refuses it) and correcting it would only
        cost time (about 2 ms per unknown long word)."""
        if lexicon is None:
            return payload, 0
        changed = 0

        def fix(text: str) -> str:
            nonlocal changed
            if len(text.split()) > max_words:
                return text
            new = lexicon.correct(text)
            changed += sum(a != b for a, b in zip(text.split(" "), new.split(" ")))
            return new

        if payload.get("messages") is not None:
            msgs = [{**m, "content": fix(m["content"])} if m.get("role") == "user" and isinstance(m.get("content"), str)
                    else m for m in payload["messages"]]
            return {**payload, "messages": msgs}, changed
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            return payload, 0
        inner = text_of_label_prompt(prompt)
        return {**payload, "prompt": fix(prompt) if inner is None else label_prompt(fix(inner))}, changed

    async def _read_through(self, payload: dict[str, Any], lexicon: Lexicon | None) -> tuple[dict[str, Any], int]:
        """:meth:`_recognised` off the event loop (a long prompt's correction is pure Python: the loop keeps
        serving other streams while it runs), in a pool of its own."""
        if lexicon is None:
            return payload, 0
        return await asyncio.get_running_loop().run_in_executor(
            self._lexicon_pool, self._recognised, payload, lexicon, self.info.max_model_len)

    # ---- generation ----------------------------------------------------------------------------------------------
    def _prompt_ids(self, payload: dict[str, Any]) -> list[int]:
        tok = self.tokenizer
        if payload.get("messages") is not None:
            if not tok.chat_template:
                raise InvalidRequestError(f"base model {self.info.name!r} has no chat template; use /v1/completions",
                                          param="messages")
            from jinja2 import TemplateError

            try:
                enc = tok.apply_chat_template(payload["messages"], add_generation_prompt=True, tokenize=True)
            except TemplateError as e:  # the model's template refuses the conversation (roles must alternate...)
                raise InvalidRequestError(f"base model {self.info.name!r}'s chat template refused these messages: "
                                          f"{e}", param="messages") from None
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
            return list(ids)
        prompt = payload.get("prompt")
        if isinstance(prompt, list):
            vocab = len(tok)
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
            return list(prompt)
        if not isinstance(prompt, str) or prompt == "":
            raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
        return list(tok(prompt)["input_ids"])  # special tokens (e.g. BOS) as the tokenizer adds them, like vLLM

    def _resolve_model(self, model: str) -> AdapterRef | None:
        if model == self.info.name:
            return None
        ref = self.store.resolve(model)
        if ref is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist. GET /v1/models lists the base model, "
                                     "the aliases and the loaded adapters.", param="model")
        return ref

    async def _route(self, payload: dict[str, Any], request_id: str) -> _Routed:
        """Which adapter serves this request: an alias routes it (sticky per caller) to a registry version;
        any other name is the base model or a stored adapter's active version."""
        model = str(payload.get("model"))
        alias = await self.router.get(model) if model != self.info.name and self.control else None
        if alias is None:
            ref = self._resolve_model(model)
            return _Routed(adapter=ref.name if ref else None, active=ref)
        caller = str(payload.get("user") or request_id)
        key = self.router.pick(alias, caller)
        shadow = self.router.shadow_of(alias, request_id)
        self.core.routed = self.router.routed  # the set of the current alias table (rebuilt on refresh only)
        routed = _Routed(adapter=None, alias=alias.alias, key=key, shadow=shadow,
                         capture=alias.capture_rate > 0 and _unit_hash(request_id) < alias.capture_rate)
        try:
            ref = await self.router.resolve(key)
        except Exception as e:  # a version that cannot be fetched is evidence against it, and the server's fault
            self.outcomes.add(routed.outcome(request_id, ok=False, latency_s=0.0))
            raise _routed_error(routed, e) from e
        return dataclasses.replace(routed, adapter=ref.name, version=ref)

    def _params(self, payload: dict[str, Any], n_prompt: int) -> SamplingParams:
        ecfg = self.settings.engine
        limit = self.info.max_model_len
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty after tokenisation", param="prompt")
        if n_prompt >= limit:
            raise ContextLengthError(f"This model's maximum context length is {limit} tokens. However, your prompt "
                                     f"has {n_prompt} tokens; shorten it.", param="messages" if payload.get(
                                         "messages") is not None else "prompt")
        max_tokens = payload.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(ecfg.default_max_tokens, limit - n_prompt)
        elif max_tokens > ecfg.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens is {max_tokens}, above this server's limit of "
                                      f"{ecfg.max_tokens_limit} (engine.max_tokens_limit)", param="max_tokens")
        elif n_prompt + max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                "Reduce the prompt or max_tokens.", param="max_tokens")
        stop = tuple(payload.get("stop") or ())
        if len(stop) > ecfg.max_stop_sequences:
            raise InvalidRequestError(f"{len(stop)} stop sequences given; at most {ecfg.max_stop_sequences}",
                                      param="stop")
        top = int(payload.get("top_logprobs") or 0)
        return SamplingParams(max_tokens=int(max_tokens), temperature=float(payload.get("temperature", 1.0)),
                              top_p=float(payload.get("top_p", 1.0)), seed=payload.get("seed"), stop=stop,
                              logprobs=bool(payload.get("logprobs")), top_logprobs=top)

    @staticmethod
    def _user_text(payload: dict[str, Any]) -> str | None:
        """The text the user wrote: the last user message, the text inside a prompt rendered with the tuning
        job's label template (the template's own words are not the user's), or the prompt."""
        if payload.get("messages") is not None:
            users = [m.get("content") or "" for m in payload["messages"] if m.get("role") == "user"]
            return users[-1] if users else None
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            return None
        inner = text_of_label_prompt(prompt)
        return prompt if inner is None else inner

    def _token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def _event(self, ev: TokenEvent, params: SamplingParams) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "token", "text": ev.text, "finish_reason": ev.finish_reason,
                               "completion_tokens": ev.completion_tokens}
        if (params.logprobs or params.top_logprobs) and ev.token_id is not None and ev.logprob is not None:
            out["logprob"] = {"token": self._token_text(ev.token_id), "logprob": ev.logprob,
                              "top": [(self._token_text(t), lp) for t, lp in (ev.top_logprobs or [])]}
        return out

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one request; see the module docstring for the event protocol."""
        request_id = str(payload.get("request_id") or uuid.uuid4().hex)
        t0 = time.perf_counter()
        try:
            routed = await self._route(payload, request_id)
            # the model reads the user's words as the adapter's lexicon corrects them; noise scoring, captures
            # and the monitor see them as sent
            served, corrected = await self._read_through(payload, await self._lexicon(routed))
            ids = self._prompt_ids(served)
            params = self._params(served, len(ids))
        except TsugikiError as e:
            yield {"type": "error", "error": e.to_dict()}
            return
        # Metric and monitor label: the routed version for alias traffic (bounded by the registry), else the name.
        label = routed.key or routed.adapter or self.info.name
        noise = self._noise(payload, len(ids), label)
        if corrected:
            self.metrics.corrected_words.labels(label).inc(corrected)
        req = GenerationRequest(request_id=request_id, prompt_ids=tuple(ids), params=params, adapter=routed.adapter,
                                version=routed.version)
        started = False
        features, prompt_logprob, logprobs, text = None, None, [], []
        try:
            async for ev in self.engine.generate(req):
                if not started:
                    started = True
                    features, prompt_logprob = ev.features, ev.prompt_logprob
                    if ev.adapter is not None and self._wants_reference(ev.adapter):
                        # first use of a version here (an alias's version, or one `tsugiki tune` wrote to the
                        # store): the drift reference it ships goes to the monitor, off the request path
                        self._background(self._ship_reference(label, ev.adapter))
                    yield {"type": "start", "prompt_tokens": len(ids),
                           "adapter": ev.adapter.key if ev.adapter else None, "alias": routed.alias,
                           "noise": {"score": round(noise.score, 4), "reasons": list(noise.reasons)} if noise else None,
                           "corrected_words": corrected}
                if ev.logprob is not None:
                    logprobs.append(ev.logprob)
                text.append(ev.text)
                out = self._event(ev, params)
                if ev.finish_reason is not None:
                    out["engine_seconds"] = time.perf_counter() - t0
                yield out
        except TsugikiError as e:
            if routed.alias is not None:
                self.outcomes.add(routed.outcome(request_id, ok=False, latency_s=time.perf_counter() - t0))
                e = _routed_error(routed, e)
            yield {"type": "error", "error": e.to_dict()}
            return
        output = "".join(text)
        confidence = sum(logprobs) / len(logprobs) if logprobs else None
        if routed.alias is not None:
            self.outcomes.add(routed.outcome(request_id, ok=True, latency_s=time.perf_counter() - t0,
                                             confidence=confidence, noisy=bool(noise and noise.reasons),
                                             output=output))
            if routed.capture:  # the prompt as sent (the refresh job recovers a label template's text)
                prompt = payload.get("prompt")
                self.outcomes.capture(request_id, routed.alias, str(routed.key),
                                      prompt if isinstance(prompt, str) else self._user_text(payload) or "", output)
            if routed.shadow is not None:
                self._background(self._shadow(routed, request_id, payload, params, output,
                                              bool(noise and noise.reasons)))
        if self.monitoring and started:
            if confidence is not None:
                self.quality.output_confidence.labels(label).observe(confidence)
            if prompt_logprob is not None:
                self.quality.prompt_perplexity.labels(label).observe(math.exp(min(-prompt_logprob, 50.0)))
            self.shipper.add(Observation(
                adapter=label, request_id=request_id, time=time.time(), features=features,
                noise_score=noise.text_score if noise else None, noise_reasons=noise.reasons if noise else (),
                prompt_tokens=len(ids), completion_tokens=len(logprobs), output_logprob=confidence,
                prompt_logprob=prompt_logprob))

    async def _shadow(self, routed: _Routed, request_id: str, payload: dict[str, Any], params: SamplingParams,
                      served: str, noisy: bool) -> None:
        """Run the shadow version on a copy of a served request, as it would be served: the request as sent, read
        through the shadow version's own lexicon (a refreshed version's lexicon knows words the served one's does
        not). Record its outcome and whether its answer equals the served one (compared only when the served
        answer was greedy, i.e. deterministic)."""
        t0 = time.perf_counter()
        assert routed.shadow is not None
        try:
            ref = await self.router.resolve(routed.shadow)
            mine, _ = await self._read_through(payload, await self._lexicon(_Routed(adapter=ref.name, version=ref)))
            ids = self._prompt_ids(mine)
            room = self.info.max_model_len - len(ids)  # corrected words may tokenize longer than the served ones
            if room < 1:  # the copy does not fit the context: no evidence either way
                logger.info("shadow request skipped: prompt fills the context", extra={"request_id": request_id})
                return
            req = GenerationRequest(request_id=f"{request_id}-shadow", prompt_ids=tuple(ids),
                                    params=dataclasses.replace(params, temperature=0.0, seed=None,
                                                               max_tokens=min(params.max_tokens, room)),
                                    version=ref, adapter=ref.name)
            logprobs, text = [], []
            async for ev in self.engine.generate(req):
                if ev.logprob is not None:
                    logprobs.append(ev.logprob)
                text.append(ev.text)
        except Exception as e:  # a failing shadow is evidence, never an error for anyone
            logger.info("shadow request failed", extra={"request_id": request_id, "error": type(e).__name__})
            self.outcomes.add(routed.outcome(request_id, ok=False, latency_s=time.perf_counter() - t0, shadow=True))
            return
        answer = "".join(text)
        self.outcomes.add(routed.outcome(
            request_id, ok=True, latency_s=time.perf_counter() - t0, noisy=noisy, output=answer, shadow=True,
            confidence=sum(logprobs) / len(logprobs) if logprobs else None,
            agree=(answer.strip() == served.strip()) if params.greedy else None))

    def _noise(self, payload: dict[str, Any], n_prompt: int, label: str) -> NoiseReport | None:
        if not self.monitoring:
            return None
        text = self._user_text(payload)
        if text is None:
            return None
        report = self.noise.score(text, prompt_tokens=n_prompt)
        self.quality.noise_score.labels(label).observe(report.score)
        for reason in report.reasons:
            self.quality.noisy.labels(label, reason).inc()
        return report

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Finish shadow requests and reference hand-overs, then hand every buffered outcome to the controller and
        every buffered observation to the monitor (tests call it; a replica calls it when it shuts down)."""
        await self.outcomes.flush()  # first: rollout evidence must not wait on anything else
        while self._tasks:  # shadow requests add outcomes; reference hand-overs are bounded (ship_reference)
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.outcomes.flush()
        await self.shipper.flush()

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._lexicon_pool.shutdown(wait=False)
