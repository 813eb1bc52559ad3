"""The Ray Serve application: a thin shell over :mod:`tsugiki.serve.api` and :mod:`tsugiki.serve.server`.

Four deployments:

* ``LLMServer`` hosts the base model, its adapters and the batching engine (one per replica; replicas,
  autoscaling and ``num_gpus`` come from the Ray Serve config).
* ``Gateway`` is the HTTP ingress: the OpenAI API, built at replica start by ``__serve_build_asgi_app__``.
* ``Monitor`` (one replica) owns the drift state.
* ``Controller`` (one replica) owns the registry: aliases, rollouts, feedback, refreshes (see ``control.py``).
  Model replicas fetch the alias table from it and ship their outcomes to it; it must run on the host that
  keeps the registry file (on a cluster: the head node, see deploy/).

Adapter state lives in the shared adapter store, so a load or unload made through any replica reaches every
replica (each loads on first use and drops unloaded versions within a second). Engine metrics of every model
replica are pushed to the ``TelemetryHub`` actor, and the gateway's ``/metrics`` re-exports them labelled by
replica, so one scrape sees the whole application.

Use it with ``tsugiki serve``, or with Ray's own ``serve run deploy/serve_config.yaml``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ray
from prometheus_client import CollectorRegistry, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from tsugiki.config import Settings, load_settings
from tsugiki.errors import TsugikiError
from tsugiki.monitoring.monitor import Monitor
from tsugiki.serve.api import build_app
from tsugiki.serve.base_model import resolve_base_model
from tsugiki.serve.control import ControlPlane
from tsugiki.serve.server import ModelServer

logger = logging.getLogger(__name__)

HUB_NAME = "tsugiki-telemetry"
HUB_NAMESPACE = "tsugiki"
PUSH_INTERVAL_S = 2.0
DRAIN_TIMEOUT_S = 10.0  # below Ray Serve's default graceful_shutdown_timeout_s (20 s)
# Ray Serve's controller kills an HTTP proxy that is not ready within RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (5 s;
# times the restart count for a restarted one), and serve.start waits 60 s for the first proxy. On 2 saturated
# cores a proxy takes minutes to start (imports, uvicorn): with 4 busy processes, serve.start raised
# ActorDiedError in 2 of 2 tries with Ray's defaults; with 30 s here it raised TimeoutError and start_serve's wait
# saw the proxy answer after 7 minutes, the controller having killed two proxies seconds before they were ready
# (each took ~3 minutes). 120 s lets the first restart (240 s) through at that load.
PROXY_READY_CHECK_TIMEOUT_S = "120"
SERVE_START_TIMEOUT_S = 600.0  # how long start_serve waits for a proxy serve.start gave up on


@ray.remote(num_cpus=0)
class TelemetryHub:
    """Latest metrics exposition text of each model replica; entries older than ``max_age_s`` are dropped."""

    def __init__(self, max_age_s: float = 30.0) -> None:
        self._texts: dict[str, tuple[float, str]] = {}
        self._max_age = max_age_s

    def push(self, source: str, text: str) -> None:
        self._texts[source] = (time.time(), text)

    def collect(self) -> dict[str, str]:
        now = time.time()
        self._texts = {k: v for k, v in self._texts.items() if now - v[0] <= self._max_age}
        return {k: v[1] for k, v in self._texts.items()}


def telemetry_hub() -> Any:
    hub: Any = TelemetryHub
    return hub.options(name=HUB_NAME, namespace=HUB_NAMESPACE, lifetime="detached", get_if_exists=True).remote()


class _PushesMetrics:
    """Pushes this replica's metrics exposition to the TelemetryHub every few seconds."""

    registry: CollectorRegistry

    def _start_push(self, prefix: str) -> None:
        ctx = serve.get_replica_context()
        self.replica = f"{prefix}-{ctx.replica_id.unique_id}" if ctx is not None else prefix
        self._hub = telemetry_hub()
        self._pusher = asyncio.get_event_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self._hub.push.remote(self.replica, generate_latest(self.registry).decode())
            except Exception:  # metrics must never take a replica down
                logger.warning("metrics push failed", exc_info=True)
            await asyncio.sleep(PUSH_INTERVAL_S)

    def _stop_push(self) -> None:
        self._pusher.cancel()


@serve.deployment(name="Monitor", num_replicas=1, max_ongoing_requests=64)
class MonitorDeployment(_PushesMetrics):
    """The one owner of drift state for the application (state persists in ``monitor.state_dir``)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.monitor = Monitor(Settings.model_validate(settings).monitor)
        self.registry = self.monitor.registry
        self._start_push("monitor")

    def observe(self, batch: list[dict[str, Any]]) -> int:
        return self.monitor.observe(batch)

    def __del__(self) -> None:
        """Graceful shutdown: what the last batches changed is saved (state is otherwise saved every
        ``save_interval_s``), so a restarted monitor resumes exactly."""
        self._stop_push()
        self.monitor.save()

    def events(self, adapter: str | None, limit: int) -> list[dict[str, Any]]:
        return self.monitor.events(adapter, limit)

    def status(self, adapter: str) -> dict[str, Any]:
        return self.monitor.status(adapter)

    def reset(self, adapter: str) -> dict[str, Any]:
        return self.monitor.reset(adapter)

    def set_reference(self, adapter: str, features: Any, source: str = "given features",
                      key: str | None = None, noise: Any = None) -> dict[str, Any]:
        return self.monitor.set_reference(adapter, features, source, key, noise)

    def alarms(self) -> dict[str, bool]:
        return self.monitor.alarms()


# Operations the gateway and the model replicas may call on the control plane (its public coroutines).
CONTROL_OPS = frozenset({"snapshot", "record_outcomes", "feedback", "feedback_list", "register", "versions",
                         "aliases", "set_capture", "rollout", "request_refresh", "refreshes", "alertmanager",
                         "events"})


@serve.deployment(name="Controller", num_replicas=1, max_ongoing_requests=256)
class ControllerDeployment(_PushesMetrics):
    """The one owner of the registry; runs the rollout and refresh loop (see :mod:`tsugiki.serve.control`)."""

    def __init__(self, settings: dict[str, Any], monitor: DeploymentHandle | None = None) -> None:
        cfg = Settings.model_validate(settings)
        events = alarms = reset = None
        if monitor is not None:
            async def events() -> list[dict[str, Any]]:
                return await monitor.events.remote(None, 200)  # type: ignore[no-any-return]

            async def alarms() -> dict[str, bool]:
                return await monitor.alarms.remote()  # type: ignore[no-any-return]

            async def reset(label: str) -> Any:
                return await monitor.reset.remote(label)

        self.plane = ControlPlane(cfg, monitor_events=events, monitor_alarms=alarms, monitor_reset=reset)
        self.registry = self.plane.metrics_registry
        self._start_push("controller")
        if cfg.controller.enabled:
            self.plane.start()

    async def __del__(self) -> None:
        """Graceful shutdown (Ray Serve awaits it): the control loop stops (see ControlPlane.stop)."""
        self._stop_push()
        await self.plane.stop()

    async def call(self, op: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a control-plane operation; errors come back as plain dicts (see LLMServer._call)."""
        if op not in CONTROL_OPS:
            return {"error": TsugikiError(f"unknown control operation {op!r}").to_dict()}
        try:
            return {"ok": await getattr(self.plane, op)(*args, **(kwargs or {}))}
        except TsugikiError as e:
            return {"error": e.to_dict()}


class HandleControl:
    """A :class:`~tsugiki.serve.server.ControlPlane`-shaped client over the Controller deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        res = await self.handle.call.remote(op, args, kwargs)
        if "error" in res:
            raise TsugikiError.from_dict(res["error"])
        return res["ok"]

    async def snapshot(self) -> dict[str, Any]:
        return await self.call("snapshot")  # type: ignore[no-any-return]

    async def record_outcomes(self, rows: list[dict[str, Any]], captures: list[Any]) -> Any:
        return await self.call("record_outcomes", rows, captures)


@serve.deployment(name="LLMServer", max_ongoing_requests=256, health_check_period_s=10)
class LLMServer(_PushesMetrics):
    """Model replica: a :class:`ModelServer` shipping observations to the monitor and metrics to the hub."""

    def __init__(self, settings: dict[str, Any], monitor: DeploymentHandle | None = None,
                 controller: DeploymentHandle | None = None) -> None:
        sink = reference = None
        if monitor is not None:
            async def sink(batch: list[dict[str, Any]]) -> None:
                await monitor.observe.remote(batch)

            async def reference(label: str, features: Any, source: str, key: str, noise: Any) -> Any:
                return await monitor.set_reference.remote(label, features, source, key, noise)

        self.server = ModelServer(Settings.model_validate(settings), monitor_sink=sink, monitor_reference=reference,
                                  control=HandleControl(controller) if controller is not None else None)
        self.registry = self.server.registry
        self._start_push("llm")

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for ev in self.server.generate(payload):
            yield ev

    async def describe(self) -> dict[str, Any]:
        return await self.server.describe()

    async def list_adapters(self) -> list[dict[str, Any]]:
        return await self.server.list_adapters()

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        return await self._call(self.server.load_adapter(name, path))

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        return await self._call(self.server.unload_adapter(name))

    @staticmethod
    async def _call(coro: Any) -> dict[str, Any]:
        # Errors cross the process boundary as plain dicts; the gateway turns them back into TsugikiErrors.
        from tsugiki.errors import TsugikiError

        try:
            return {"ok": await coro}
        except TsugikiError as e:
            return {"error": e.to_dict()}

    async def metrics_text(self) -> str:
        return self.server.metrics_text()

    async def __del__(self) -> None:
        """Graceful shutdown (Ray Serve awaits it after the replica's last request): buffered outcomes, captures
        and monitor observations are handed over before the engine stops, so a scale-down or redeploy loses none
        of what it accepted. Bounded, as Ray Serve's ``graceful_shutdown_timeout_s`` is."""
        self._stop_push()
        try:
            await asyncio.wait_for(self.server.drain(), timeout=DRAIN_TIMEOUT_S)
        except Exception as e:  # the controller or monitor may be shutting down too
            logger.warning(f"shutdown drain incomplete: {type(e).__name__}")
        else:
            logger.info("replica drained: buffered outcomes and observations handed over")
        self.server.shutdown()

    def check_health(self) -> None:
        if not self.server.engine._thread.is_alive():
            raise RuntimeError("engine thread died")


class RayClient:
    """The gateway's :class:`~tsugiki.serve.api.ModelClient` over the LLMServer deployment handle."""

    def __init__(self, handle: DeploymentHandle, monitor: DeploymentHandle,
                 controller: DeploymentHandle | None = None) -> None:
        self.handle = handle
        self.stream = handle.options(stream=True)
        self.monitor = monitor
        self.controller = HandleControl(controller) if controller is not None else None
        self.hub = telemetry_hub()

    async def control(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.controller is None:
            from tsugiki.errors import OverloadedError

            raise OverloadedError("the controller is not running", code="controller_unavailable")
        return await self.controller.call(op, *args, **kwargs)

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        gen: Any = self.stream.generate.remote(payload)
        async for ev in gen:
            yield ev

    async def describe(self) -> dict[str, Any]:
        return await self.handle.describe.remote()  # type: ignore[no-any-return]

    async def list_adapters(self) -> list[dict[str, Any]]:
        return await self.handle.list_adapters.remote()  # type: ignore[no-any-return]

    async def _unwrap(self, res: dict[str, Any]) -> dict[str, Any]:
        from tsugiki.errors import TsugikiError

        if "error" in res:
            raise TsugikiError.from_dict(res["error"])
        return res["ok"]  # type: ignore[no-any-return]

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        return await self._unwrap(await self.handle.load_adapter.remote(name, path))

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        return await self._unwrap(await self.handle.unload_adapter.remote(name))

    async def metrics_texts(self) -> dict[str, str]:
        return await self.hub.collect.remote()  # type: ignore[no-any-return]

    async def monitor_events(self, adapter: str | None, limit: int) -> list[dict[str, Any]]:
        return await self.monitor.events.remote(adapter, limit)  # type: ignore[no-any-return]

    async def monitor_status(self, adapter: str) -> dict[str, Any]:
        return await self.monitor.status.remote(adapter)  # type: ignore[no-any-return]

    async def monitor_reset(self, adapter: str) -> dict[str, Any]:
        return await self.monitor.reset.remote(adapter)  # type: ignore[no-any-return]


@serve.deployment(name="Gateway", max_ongoing_requests=1024)
@serve.ingress()
class Gateway(_PushesMetrics):
    """HTTP ingress: the OpenAI-compatible API over the LLMServer deployment. Its request metrics go to the
    telemetry hub like every replica's, so any gateway replica's ``/metrics`` shows all of them."""

    def __init__(self, llm: DeploymentHandle, monitor: DeploymentHandle, settings: dict[str, Any],
                 controller: DeploymentHandle | None = None) -> None:
        self._llm = llm
        self._monitor = monitor
        self._controller = controller
        self._settings = Settings.model_validate(settings)

    def __serve_build_asgi_app__(self) -> Any:
        self.registry = CollectorRegistry()
        self._start_push("gateway")
        return build_app(RayClient(self._llm, self._monitor, self._controller), self._settings.server,
                         registry=self.registry, echo_request_id=False, own_metrics_in_texts=True)


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``; a local cluster it starts gets :data:`PROXY_READY_CHECK_TIMEOUT_S` (unless the
    environment sets one): Ray's processes inherit the driver's environment. A running cluster keeps its own."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_CHECK_TIMEOUT_S)
    ray.init(**kwargs)


def start_serve(http_options: dict[str, Any], timeout_s: float = SERVE_START_TIMEOUT_S) -> None:
    """``serve.start``; when its HTTP proxy died or was late (serve.start raises, while the controller it started
    keeps restarting the proxy with a longer readiness timeout each time), wait until the proxy answers HTTP on
    the configured port, for up to ``timeout_s``. A second ``serve.start`` alone would not do: it connects to the
    running controller and returns at once, proxy or not."""
    try:
        serve.start(http_options=http_options)
        return
    except (ray.exceptions.RayActorError, TimeoutError) as e:
        logger.warning("Ray Serve's HTTP proxy did not come up in serve.start (%s); waiting up to %.0f s for it",
                       type(e).__name__, timeout_s)
    serve.start(http_options=http_options)  # the running controller's client, for the serve.run that follows
    host = str(http_options.get("host") or "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{host}:{int(http_options.get('port') or 8000)}/-/healthz"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # any answer (503 before the first route table too): the proxy listens; never via an HTTP(S)_PROXY
            httpx.get(url, timeout=5.0, trust_env=False)
            return
        except httpx.HTTPError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Ray Serve's HTTP proxy did not answer on {url} within {timeout_s:.0f} s; its "
                                   "log is under /tmp/ray/session_latest/logs/serve/") from None
            time.sleep(1.0)


def resolved_settings(settings: Settings) -> dict[str, Any]:
    """Settings with every path made absolute and the base model resolved (converted once, here, with progress)."""
    base = resolve_base_model(settings.model, progress=True)
    model = settings.model.model_copy(update={
        "base_model": str(base),
        "served_name": settings.model.served_name or (
            "SmolLM2-135M-Instruct" if settings.model.base_model in (None, "default") else base.name)})
    adapters = settings.adapters.model_copy(update={"store_dir": settings.store_dir(),
                                                    "roots": settings.adapter_roots()})
    monitor = settings.monitor.model_copy(update={"state_dir": settings.monitor_dir()})
    registry = settings.registry.model_copy(update={"path": settings.registry_path(),
                                                    "artifacts": settings.artifacts_uri()})
    return settings.model_copy(update={"model": model, "adapters": adapters, "monitor": monitor,
                                       "registry": registry}).model_dump(mode="json")


def build_application(settings: Settings) -> serve.Application:
    data = resolved_settings(settings)
    srv = settings.server
    llm_deployment: Any = LLMServer  # the @serve.deployment decorator hides .options/.bind from type checkers
    gateway: Any = Gateway.options(ray_actor_options={"num_cpus": 0.1})  # type: ignore[attr-defined]
    monitor_deployment: Any = MonitorDeployment
    monitor = monitor_deployment.options(ray_actor_options={"num_cpus": 0.1}).bind(data)
    controller_deployment: Any = ControllerDeployment
    controller = controller_deployment.options(ray_actor_options={"num_cpus": 0.1}).bind(data, monitor)
    llm = llm_deployment.options(num_replicas=srv.model_replicas,
                                 ray_actor_options={"num_cpus": srv.model_num_cpus, "num_gpus": srv.model_num_gpus})
    return gateway.bind(llm.bind(data, monitor, controller), monitor, data,  # type: ignore[no-any-return]
                        controller)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``args`` may hold ``config_file`` and settings sections.

    Replica counts, autoscaling and ``ray_actor_options`` set per deployment in the Serve config file override
    the defaults built here.
    """
    args = dict(args or {})
    config_file = args.pop("config_file", None)
    return build_application(load_settings(config_file, **args))
