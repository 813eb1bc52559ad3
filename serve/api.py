"""The OpenAI-compatible HTTP API: routes, error shape, request ids, access control and request metrics.

:func:`build_app` works over any :class:`ModelClient`: the Ray Serve ingress passes one that calls the model
deployment through a handle; tests and benchmarks can pass :class:`LocalClient` around an in-process
:class:`~tsugiki.serve.server.ModelServer`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tsugiki.config import ServerConfig
from tsugiki.errors import (
    AuthenticationError,
    EngineError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    TsugikiError,
)
from tsugiki.serve.metrics import GatewayMetrics, MergedExpositions
from tsugiki.serve.protocol import (
    SQLITE_MAX_INT,
    CaptureRequest,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    LoadAdapterRequest,
    RefreshRequest,
    RegisterVersionRequest,
    RolloutStartRequest,
    VLLMLoadRequest,
    VLLMUnloadRequest,
)

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ModelClient(Protocol):
    """What the HTTP front needs from the model side."""

    def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def describe(self) -> dict[str, Any]: ...

    async def list_adapters(self) -> list[dict[str, Any]]: ...

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]: ...

    async def unload_adapter(self, name: str) -> dict[str, Any]: ...

    async def metrics_texts(self) -> dict[str, str]: ...

    async def monitor_events(self, adapter: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def monitor_status(self, adapter: str) -> dict[str, Any]: ...

    async def monitor_reset(self, adapter: str) -> dict[str, Any]: ...

    async def control(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """A control-plane operation (:class:`~tsugiki.serve.control.ControlPlane`'s method ``op``)."""


class LocalClient:
    """A :class:`ModelClient` over an in-process ModelServer, Monitor and ControlPlane (tests, benchmarks)."""

    def __init__(self, server: Any, monitor: Any = None, control: Any = None) -> None:
        self.server = server
        self.monitor = monitor
        self.control_plane = control

    async def control(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.control_plane is None:
            raise OverloadedError("the controller is not running", code="controller_unavailable")
        return await getattr(self.control_plane, op)(*args, **kwargs)

    def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.server.generate(payload)  # type: ignore[no-any-return]

    async def describe(self) -> dict[str, Any]:
        return await self.server.describe()  # type: ignore[no-any-return]

    async def list_adapters(self) -> list[dict[str, Any]]:
        return await self.server.list_adapters()  # type: ignore[no-any-return]

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        return await self.server.load_adapter(name, path)  # type: ignore[no-any-return]

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        return await self.server.unload_adapter(name)  # type: ignore[no-any-return]

    async def metrics_texts(self) -> dict[str, str]:
        texts = {"local": self.server.metrics_text()}
        if self.monitor is not None:
            texts["monitor"] = generate_latest(self.monitor.registry).decode()
        if self.control_plane is not None:
            texts["controller"] = generate_latest(self.control_plane.metrics_registry).decode()
        return texts

    def _monitor(self) -> Any:
        if self.monitor is None:
            raise OverloadedError("the monitor is not running", code="monitor_unavailable")
        return self.monitor

    async def monitor_events(self, adapter: str | None, limit: int) -> list[dict[str, Any]]:
        return self._monitor().events(adapter, limit)  # type: ignore[no-any-return]

    async def monitor_status(self, adapter: str) -> dict[str, Any]:
        return self._monitor().status(adapter)  # type: ignore[no-any-return]

    async def monitor_reset(self, adapter: str) -> dict[str, Any]:
        return self._monitor().reset(adapter)  # type: ignore[no-any-return]


def error_response(err: TsugikiError, request_id: str | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    return JSONResponse(err.to_openai(), status_code=err.status, headers=headers)


def _describe_validation(e: ValidationError | RequestValidationError,
                         sources: tuple[str, ...] = ("body",)) -> tuple[str, str | None]:
    """The first problem as ``field: message`` and the field (locations leave out ``sources``: where FastAPI
    found the value)."""
    errors = e.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    parts = [str(x) for x in first["loc"] if x not in sources]
    loc = ".".join(parts)
    msg = f"{loc}: {first['msg']}" if loc else str(first["msg"])
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return msg, (parts[0] if parts else None)


async def json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers beyond Python's digit limit
        raise InvalidRequestError(f"request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError:  # arrays or objects nested thousands deep
        raise InvalidRequestError("request body nests arrays or objects too deeply to parse",
                                  code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:  # JSON may spell a lone UTF-16 surrogate ("\ud800"), which no tokenizer, database or encoder accepts
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"request body is not valid Unicode text: it contains a lone UTF-16 surrogate "
                                  f"({e.object[e.start:e.end]!a}); send each character as a whole code point "
                                  "or a surrogate pair", code="invalid_json") from None
    return data


async def parse_body(request: Request, model: type[M]) -> M:
    data = await json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = _describe_validation(e)
        raise InvalidRequestError(msg, param=param) from e


class _Auth:
    def __init__(self, cfg: ServerConfig) -> None:
        self.api_keys = tuple(k.encode() for k in cfg.api_keys)
        self.admin_keys = (cfg.admin_key.encode(),) if cfg.admin_key else self.api_keys

    @staticmethod
    def _token(request: Request) -> bytes | None:
        h = request.headers.get("authorization", "")
        return h[7:].strip().encode() if h.lower().startswith("bearer ") else None

    def _check(self, request: Request, keys: tuple[bytes, ...], what: str) -> None:
        if not keys:
            return
        token = self._token(request)
        if token is None:
            raise AuthenticationError(f"{what} needs an API key: send 'Authorization: Bearer <key>'")
        if not any(hmac.compare_digest(token, k) for k in keys):
            raise AuthenticationError(f"the API key is not valid for {what}")

    def inference(self, request: Request) -> None:
        self._check(request, self.api_keys, "inference")

    def admin(self, request: Request) -> None:
        self._check(request, self.admin_keys, "adapter management")


def build_app(client: ModelClient, cfg: ServerConfig, *, registry: CollectorRegistry | None = None,
              echo_request_id: bool = True, own_metrics_in_texts: bool = False) -> FastAPI:
    """The gateway's FastAPI app over ``client``.

    ``echo_request_id=False`` under Ray Serve, whose proxy already sets ``x-request-id`` on every response
    (to the id it put on the request, which this app adopts). ``own_metrics_in_texts``: this app's request
    metrics reach ``client.metrics_texts()`` already (every gateway replica pushes them to the telemetry hub),
    so ``/metrics`` serves only those: whichever gateway replica a scrape reaches, it sees every replica's
    counters, each labelled with its replica, instead of one replica's counters jumping between scrapes.
    """
    app = FastAPI(title="tsugiki", docs_url=None, redoc_url=None)
    registry = registry or CollectorRegistry()
    metrics = GatewayMetrics(registry)
    auth = _Auth(cfg)
    state: dict[str, Any] = {"base": None, "known": set(), "aliases": set()}
    merged = CollectorRegistry(auto_describe=False)
    remote_texts: dict[str, str] = {}
    merged.register(MergedExpositions(lambda: remote_texts))

    async def base_model() -> str:
        if state["base"] is None:
            state["base"] = (await client.describe())["base_model"]
        return str(state["base"])

    async def alias_names() -> set[str]:
        try:
            state["aliases"] = {a["alias"] for a in await client.control("aliases")}
        except TsugikiError:
            pass  # no controller: no aliases
        return set(state["aliases"])

    async def routed_versions() -> set[str]:
        """Version keys (name@vN) the aliases route or shadow to: the monitor's labels for alias traffic."""
        try:
            aliases = await client.control("aliases")
        except TsugikiError:
            return set()
        return {k for a in aliases for k in a["routes"]} | {a["shadow"] for a in aliases if a["shadow"]}

    async def label_for(model: str) -> str:
        # Bounded labels: the base model, adapter names known to the store, aliases, else "unknown".
        if model == await base_model() or model in state["known"] or model in state["aliases"]:
            return model
        names = {a["name"] for a in await client.list_adapters()}
        state["known"] = names
        return model if model in names or model in await alias_names() else "unknown"

    # ---- cross-cutting ---------------------------------------------------------------------------------------
    @app.middleware("http")
    async def request_id_mw(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else f"req-{uuid.uuid4().hex}"
        request.state.request_id = rid
        try:
            response = await call_next(request)
        except Exception:  # never a stack trace to the client
            logger.exception("unhandled error", extra={"request_id": rid})
            response = error_response(TsugikiError("internal error; the request id is in x-request-id"))
        if echo_request_id:
            response.headers["x-request-id"] = rid
        return response

    @app.exception_handler(TsugikiError)
    async def _tsugiki_error(request: Request, exc: TsugikiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _params_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a query parameter of the wrong type (?limit=abc): FastAPI's own 422 has another shape
        msg, param = _describe_validation(exc, ("query", "path", "body", "header"))
        return error_response(InvalidRequestError(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        body = {"error": {"message": f"{request.method} {request.url.path}: {exc.detail}", "type": kind,
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    # ---- health and metrics ----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            info = await client.describe()
        except Exception as e:  # not ready is an answer, not an error
            return JSONResponse({"status": "not ready", "reason": str(e)[:200]}, status_code=503)
        return JSONResponse({"status": "ready", "base_model": info["base_model"]})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        try:
            texts = await client.metrics_texts()
        except Exception:
            logger.warning("could not collect model replica metrics")
            texts = {}
        remote_texts.clear()
        remote_texts.update(texts)
        body = generate_latest(merged) if own_metrics_in_texts else generate_latest(registry) + generate_latest(merged)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # ---- models and adapters ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        auth.inference(request)
        info = await client.describe()
        base = info["base_model"]
        data = [{"id": base, "object": "model", "created": info["created"], "owned_by": "tsugiki", "root": base,
                 "parent": None, "max_model_len": info["max_model_len"]}]
        for a in info["adapters"]:
            data.append({"id": a["name"], "object": "model", "created": int(a["created"]), "owned_by": "tsugiki",
                         "root": a["path"], "parent": base, "version": a["version"], "digest": a["digest"]})
        try:
            aliases = await client.control("aliases")
        except TsugikiError:
            aliases = []  # no controller: the base model and adapters still answer
        for a in aliases:
            data.append({"id": a["alias"], "object": "model", "created": int(a["updated"]), "owned_by": "tsugiki",
                         "root": None, "parent": base, "alias": True, "routes": a["routes"],
                         "shadow": a["shadow"], "shadow_share": a["shadow_share"], "rollout": a["rollout"]})
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        auth.admin(request)
        return {"object": "list", "data": await client.list_adapters()}

    async def _load(name: str, path: str) -> dict[str, Any]:
        try:
            rec = await client.load_adapter(name, path)
        except TsugikiError:
            metrics.adapter_ops.labels("load", "error").inc()
            raise
        metrics.adapter_ops.labels("load", "success").inc()
        state["known"].add(name)
        return rec

    async def _unload(name: str) -> dict[str, Any]:
        try:
            rec = await client.unload_adapter(name)
        except TsugikiError:
            metrics.adapter_ops.labels("unload", "error").inc()
            raise
        metrics.adapter_ops.labels("unload", "success").inc()
        return rec

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        auth.admin(request)
        body = await parse_body(request, LoadAdapterRequest)
        return JSONResponse(await _load(body.name, body.path), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
        auth.admin(request)
        return await _unload(name)

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request) -> PlainTextResponse:
        auth.admin(request)
        body = await parse_body(request, VLLMLoadRequest)
        await _load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request) -> PlainTextResponse:
        auth.admin(request)
        body = await parse_body(request, VLLMUnloadRequest)
        await _unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ---- monitoring ------------------------------------------------------------------------------------------
    @app.get("/v1/monitor/events")
    async def monitor_events(request: Request, adapter: str | None = None, limit: int = 100) -> dict[str, Any]:
        auth.inference(request)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError(f"limit must be between 1 and 1000, got {limit}", param="limit")
        return {"object": "list", "data": await client.monitor_events(adapter, limit)}

    async def known_to_monitor(name: str) -> None:
        if await label_for(name) == "unknown" and name not in await routed_versions():
            raise NotFoundError(f"{name!r} is neither the base model, a loaded adapter nor a version an alias "
                                "routes to", param="name", code="model_not_found")

    @app.get("/v1/monitor/adapters/{name}")
    async def monitor_adapter(name: str, request: Request) -> dict[str, Any]:
        auth.inference(request)
        await known_to_monitor(name)
        return await client.monitor_status(name)

    @app.post("/v1/monitor/adapters/{name}/reset")
    async def monitor_reset(name: str, request: Request) -> dict[str, Any]:
        auth.admin(request)
        await known_to_monitor(name)
        return await client.monitor_reset(name)

    # ---- registry, aliases, rollouts, feedback, refresh -------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        auth.inference(request)
        body = await parse_body(request, FeedbackRequest)
        return JSONResponse(await client.control("feedback", body.model_dump()), status_code=201)

    @app.get("/v1/feedback")
    async def feedback_list(request: Request, alias: str | None = None, limit: int = 100) -> dict[str, Any]:
        auth.admin(request)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError(f"limit must be between 1 and 1000, got {limit}", param="limit")
        return {"object": "list", **await client.control("feedback_list", alias, limit)}

    @app.get("/v1/aliases")
    async def aliases(request: Request) -> dict[str, Any]:
        auth.inference(request)
        return {"object": "list", "data": await client.control("aliases")}

    @app.get("/v1/aliases/{alias}")
    async def alias_status(alias: str, request: Request) -> dict[str, Any]:
        auth.inference(request)
        return await client.control("rollout", "status", alias)  # type: ignore[no-any-return]

    @app.put("/v1/aliases/{alias}/capture")
    async def alias_capture(alias: str, request: Request) -> dict[str, Any]:
        auth.admin(request)
        body = await parse_body(request, CaptureRequest)
        return await client.control("set_capture", alias, body.rate, body.retention)  # type: ignore[no-any-return]

    @app.get("/v1/registry/versions")
    async def registry_versions(request: Request, name: str | None = None) -> dict[str, Any]:
        auth.admin(request)
        return {"object": "list", "data": await client.control("versions", name)}

    @app.post("/v1/registry/versions")
    async def registry_register(request: Request) -> JSONResponse:
        auth.admin(request)
        body = await parse_body(request, RegisterVersionRequest)
        rec = await client.control("register", body.name, body.path, data_path=body.data_path, tune=body.tune)
        return JSONResponse(rec, status_code=201)

    @app.get("/v1/registry/events")
    async def registry_events(request: Request, alias: str | None = None, since_id: int | None = None,
                              limit: int = 100) -> dict[str, Any]:
        auth.admin(request)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError(f"limit must be between 1 and 1000, got {limit}", param="limit")
        if since_id is not None and not 0 <= since_id <= SQLITE_MAX_INT:
            raise InvalidRequestError(f"since_id must be an event id (0 to {SQLITE_MAX_INT}), got {since_id}",
                                      param="since_id")
        return {"object": "list", "data": await client.control("events", alias, since_id, limit)}

    @app.post("/v1/rollouts/{alias}")
    async def rollout_start(alias: str, request: Request) -> JSONResponse:
        auth.admin(request)
        body = await parse_body(request, RolloutStartRequest)
        return JSONResponse(await client.control("rollout", "start", alias, candidate=body.candidate,
                                                 actor="operator"), status_code=201)

    @app.get("/v1/rollouts/{alias}")
    async def rollout_status(alias: str, request: Request) -> dict[str, Any]:
        auth.inference(request)
        return await client.control("rollout", "status", alias)  # type: ignore[no-any-return]

    @app.post("/v1/rollouts/{alias}/{op}")
    async def rollout_op(alias: str, op: str, request: Request) -> dict[str, Any]:
        auth.admin(request)
        if op not in ("promote", "pause", "resume", "rollback"):
            raise NotFoundError(f"no rollout operation {op!r}; use promote, pause, resume or rollback", param="op")
        return await client.control("rollout", op, alias, actor="operator")  # type: ignore[no-any-return]

    @app.post("/v1/refresh/{alias}")
    async def refresh(alias: str, request: Request) -> JSONResponse:
        auth.admin(request)
        body = await parse_body(request, RefreshRequest)
        res = await client.control("request_refresh", alias, reason=body.reason, source="operator", force=body.force)
        return JSONResponse(res, status_code=202 if res.get("accepted") else 200)

    @app.get("/v1/refreshes")
    async def refreshes(request: Request, alias: str | None = None) -> dict[str, Any]:
        auth.admin(request)
        return {"object": "list", "data": await client.control("refreshes", alias)}

    @app.post("/v1/alerts/alertmanager")
    async def alertmanager(request: Request) -> dict[str, Any]:
        auth.admin(request)  # Alertmanager sends it with http_config.authorization (deploy/alertmanager)
        return await client.control("alertmanager", await json_object(request))  # type: ignore[no-any-return]

    # ---- inference -------------------------------------------------------------------------------------------
    async def run(request: Request, body: CompletionRequest | ChatRequest, chat: bool) -> Response:
        rid: str = request.state.request_id
        t0 = time.perf_counter()
        payload: dict[str, Any] = {"request_id": rid, "model": body.model, "max_tokens": body.token_budget(),
                                   "temperature": body.temperature, "top_p": body.top_p, "stop": body.stop_list(),
                                   "seed": body.seed,
                                   # the sticky-routing key of aliases: the OpenAI `user`, or a header
                                   "user": body.user or request.headers.get("x-tsugiki-caller")}
        if isinstance(body, ChatRequest):
            payload["messages"] = [{"role": m.role, "content": m.text()} for m in body.messages]
            payload["logprobs"] = body.logprobs
            payload["top_logprobs"] = (body.top_logprobs or 0) if body.logprobs else 0
        else:
            payload["prompt"] = body.prompt
            payload["logprobs"] = body.logprobs is not None
            payload["top_logprobs"] = body.logprobs or 0
        label = await label_for(body.model)
        events = client.generate(payload)
        first = await events.__anext__()
        if first["type"] == "error":
            err = TsugikiError.from_dict(first["error"])
            metrics.requests.labels(label, "client_error" if err.status < 500 else "server_error").inc()
            return error_response(err, rid)
        prompt_tokens = int(first["prompt_tokens"])
        rec = _Recorder(metrics, label, t0, prompt_tokens)
        headers = {}
        if first.get("alias") is not None and first.get("adapter"):
            headers["x-tsugiki-version"] = str(first["adapter"])  # which version of the alias answered
        if first.get("noise") is not None:
            # Applications can act on noisy input (ask to rephrase, route to a robust adapter).
            headers["x-tsugiki-noise-score"] = f"{first['noise']['score']:.3f}"
            headers["x-tsugiki-noise-reasons"] = ",".join(first["noise"]["reasons"]) or "none"
        if first.get("corrected_words"):
            # the adapter's lexicon corrected this many of the user's words before the model read them
            headers["x-tsugiki-corrected-words"] = str(first["corrected_words"])
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = _sse(events, rec, ident, created, body.model, chat, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", **headers})
        text, lps, finish, completion, engine_s = [], [], None, 0, 0.0
        async for ev in events:
            if ev["type"] == "error":
                rec.done("server_error")
                return error_response(TsugikiError.from_dict(ev["error"]), rid)
            rec.token()
            text.append(ev["text"])
            if "logprob" in ev:
                lps.append(ev["logprob"])
            completion = ev["completion_tokens"]
            if ev["finish_reason"] is not None:
                finish, engine_s = ev["finish_reason"], float(ev.get("engine_seconds", 0.0))
        rec.done("success", completion)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        content = "".join(text)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                                      "logprobs": _chat_logprobs(lps) if payload["logprobs"] else None,
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish,
                      "logprobs": _completion_logprobs(lps) if payload["logprobs"] else None}
        out = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": body.model, "choices": [choice], "usage": usage}
        return JSONResponse(out, headers={"x-engine-time-ms": f"{engine_s * 1000:.3f}", **headers})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        auth.inference(request)
        return await run(request, await parse_body(request, CompletionRequest), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        auth.inference(request)
        return await run(request, await parse_body(request, ChatRequest), chat=True)

    return app


class _Recorder:
    """Request metrics: TTFT at the first token, TPOT and end-to-end latency at the end."""

    def __init__(self, metrics: GatewayMetrics, label: str, t0: float, prompt_tokens: int) -> None:
        self.m, self.label, self.t0, self.prompt_tokens = metrics, label, t0, prompt_tokens
        self.first: float | None = None
        self.last = t0
        self.n = 0
        metrics.prompt_tokens.labels(label).inc(prompt_tokens)

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.ttft.labels(self.label).observe(now - self.t0)
        self.last = now
        self.n += 1

    def done(self, outcome: str, completion_tokens: int | None = None) -> None:
        self.m.requests.labels(self.label, outcome).inc()
        self.m.latency.labels(self.label).observe(time.perf_counter() - self.t0)
        n = self.n if completion_tokens is None else completion_tokens
        self.m.completion_tokens.labels(self.label).inc(n)
        if self.first is not None and self.n > 1:
            self.m.tpot.labels(self.label).observe((self.last - self.first) / (self.n - 1))


def _sse_line(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _sse(events: AsyncIterator[dict[str, Any]], rec: _Recorder, ident: str, created: int, model: str,
               chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish: str | None, logprob: dict[str, Any] | None = None,
              role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if delta_text:
                delta["content"] = delta_text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                      "logprobs": _chat_logprobs([logprob]) if logprob else None}
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish,
                      "logprobs": _completion_logprobs([logprob]) if logprob else None}
        return {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}

    completion, outcome = 0, "aborted"
    try:
        try:
            if chat:
                yield _sse_line(chunk(None, None, role=True))
            async for ev in events:
                if ev["type"] == "error":
                    outcome = "server_error"
                    yield _sse_line(TsugikiError.from_dict(ev["error"]).to_openai())
                    break
                rec.token()
                completion = ev["completion_tokens"]
                if ev["text"] or ev["finish_reason"] or "logprob" in ev:
                    yield _sse_line(chunk(ev["text"], ev["finish_reason"], ev.get("logprob")))
                if ev["finish_reason"] is not None:
                    outcome = "success"
        except Exception:  # the replica died or Ray failed mid-stream: the client still gets an error and the end
            logger.exception("stream failed", extra={"request_id": ident})
            outcome = "server_error"
            yield _sse_line(EngineError("the server failed while streaming; the response is incomplete").to_openai())
        if include_usage and outcome == "success":
            usage = {"prompt_tokens": rec.prompt_tokens, "completion_tokens": completion,
                     "total_tokens": rec.prompt_tokens + completion}
            yield _sse_line({"id": ident, "object": obj, "created": created, "model": model, "choices": [],
                             "usage": usage})
        yield b"data: [DONE]\n\n"
    finally:
        rec.done(outcome, completion)


def _chat_logprobs(lps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": [{"token": lp["token"], "logprob": lp["logprob"], "bytes": list(lp["token"].encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp["top"]]}
                        for lp in lps]}


def _completion_logprobs(lps: list[dict[str, Any]]) -> dict[str, Any]:
    offsets, pos = [], 0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp["token"])
    return {"tokens": [lp["token"] for lp in lps], "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [dict(lp["top"]) for lp in lps] if any(lp["top"] for lp in lps) else None,
            "text_offset": offsets}
