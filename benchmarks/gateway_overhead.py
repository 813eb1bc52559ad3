"""Gateway overhead: latency of a 1-token completion over HTTP minus the engine's own time.

Three paths to the same request (``POST /v1/completions``, ``max_tokens=1``, greedy, non-streaming), run
interleaved, ``--requests`` times each, one request at a time:

* ``ray serve``   the real application as ``tsugiki serve`` starts it (``build_application``; Ray Serve's HTTP
                  proxy -> Gateway replica (FastAPI) -> deployment handle -> LLMServer replica), over TCP with
                  httpx (keep-alive).
* ``in-process``  the same FastAPI app (``build_app``) over a :class:`LocalClient` around an in-process
                  ModelServer, called through ``httpx.ASGITransport`` (no socket, no Ray).
* ``direct``      ``ModelServer.generate(payload)`` iterated in-process: no HTTP, no app.

Engine time is the ``x-engine-time-ms`` response header (measured inside the model replica around the
engine's generation; for ``direct`` the same ``engine_seconds`` value from the last event). Overhead is
``client-side latency - engine time`` per request; the table reports medians (and p95) over requests. A
``GET /healthz`` series (no model call) on both HTTP paths gives the bare routing cost.

Run: ``python benchmarks/gateway_overhead.py [--requests 50] [--warmup 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import torch

PROMPT = "The capital of France is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_completion(client: Any, payload: dict[str, Any]) -> tuple[float, float]:
    """(client-side latency s, engine time s) of one completion."""
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=payload)
    body = r.content  # read fully
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {body[:500]!r}")
    usage = r.json()["usage"]
    if usage["completion_tokens"] != 1:
        raise RuntimeError(f"expected 1 completion token, got {usage}")
    eng = r.headers.get("x-engine-time-ms")
    if eng is None:
        raise RuntimeError(f"no x-engine-time-ms header in the response; headers: {dict(r.headers)}")
    return dt, float(eng) / 1e3


async def http_get(client: Any, path: str) -> float:
    t0 = time.perf_counter()
    r = await client.get(path)
    _ = r.content
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"GET {path}: HTTP {r.status_code}")
    return dt


async def direct(server: Any, payload: dict[str, Any]) -> tuple[float, float]:
    t0 = time.perf_counter()
    engine_s = None
    async for ev in server.generate(dict(payload)):
        if ev["type"] == "error":
            raise RuntimeError(ev["error"])
        if ev.get("finish_reason") is not None:
            engine_s = float(ev["engine_seconds"])
    dt = time.perf_counter() - t0
    assert engine_s is not None
    return dt, engine_s


async def wait_ready(client: Any, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await client.get("/readyz")
            if r.status_code == 200:
                return
        except httpx.HTTPError:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the Ray Serve app did not become ready")
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> int:
    import httpx
    import ray
    from ray import serve

    from tsugiki.config import load_settings
    from tsugiki.serve.api import LocalClient, build_app
    from tsugiki.serve.deployments import build_application, init_ray, start_serve
    from tsugiki.serve.server import ModelServer

    tmp = Path(tempfile.mkdtemp(prefix="tsugiki-bench-gateway-"))
    port = free_port()
    settings = load_settings(adapters={"store_dir": str(tmp / "store")}, server={"port": port})

    C.log("starting the in-process ModelServer + FastAPI app")
    local_server = ModelServer(settings)
    name = local_server.info.name
    payload = {"model": name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    local_app = build_app(LocalClient(local_server), settings.server)

    C.log(f"starting Ray and the Ray Serve app on 127.0.0.1:{port} (as `tsugiki serve` does)")
    t0 = time.perf_counter()
    app = build_application(settings)
    init_ray(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        serve.run(app, name="tsugiki", route_prefix="/")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as ray_client, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=local_app), base_url="http://inproc",
                                  timeout=120) as local_client:
            await wait_ready(ray_client)
            C.log(f"Ray Serve app ready after {time.perf_counter() - t0:.1f}s")

            paths = {
                "ray serve": lambda: http_completion(ray_client, payload),
                "in-process": lambda: http_completion(local_client, payload),
                "direct": lambda: direct(local_server, payload),
            }
            order = list(paths)
            for _ in range(args.warmup):
                for p in order:
                    await paths[p]()
                await http_get(ray_client, "/healthz")
                await http_get(local_client, "/healthz")
            C.log(f"warm-up done ({args.warmup} requests per path); timing {args.requests} per path, interleaved")

            lat: dict[str, list[float]] = {p: [] for p in order}
            eng: dict[str, list[float]] = {p: [] for p in order}
            health: dict[str, list[float]] = {"ray serve": [], "in-process": []}
            with C.CpuMeter() as meter:
                for i in range(args.requests):
                    shift = i % len(order)
                    for p in order[shift:] + order[:shift]:
                        dt, e = await paths[p]()
                        lat[p].append(dt)
                        eng[p].append(e)
                    health["ray serve"].append(await http_get(ray_client, "/healthz"))
                    health["in-process"].append(await http_get(local_client, "/healthz"))
                    if (i + 1) % 10 == 0:
                        C.log(f"{i + 1}/{args.requests}: last ray {lat['ray serve'][-1] * 1e3:.1f} ms "
                              f"(engine {eng['ray serve'][-1] * 1e3:.1f}), in-process "
                              f"{lat['in-process'][-1] * 1e3:.1f} ms (engine {eng['in-process'][-1] * 1e3:.1f})")
    finally:
        C.log("shutting down Ray Serve and Ray")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            local_server.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)

    ms = 1e3
    rows, summary = [], {}
    for p in order:
        over = [a - b for a, b in zip(lat[p], eng[p])]
        s = {"http_p50_ms": C.pct(lat[p], 50) * ms, "engine_p50_ms": C.pct(eng[p], 50) * ms,
             "overhead_p50_ms": C.pct(over, 50) * ms, "overhead_p95_ms": C.pct(over, 95) * ms,
             "http_p95_ms": C.pct(lat[p], 95) * ms}
        summary[p] = s
        rows.append([p, s["http_p50_ms"], s["engine_p50_ms"], s["overhead_p50_ms"], s["overhead_p95_ms"],
                     s["http_p95_ms"]])
    for p, xs in health.items():
        summary[f"healthz {p}"] = {"http_p50_ms": C.pct(xs, 50) * ms, "http_p95_ms": C.pct(xs, 95) * ms}
        rows.append([f"GET /healthz, {p}", C.pct(xs, 50) * ms, float("nan"), float("nan"), float("nan"),
                     C.pct(xs, 95) * ms])
    C.print_table(f"gateway overhead (ms): {args.requests} sequential 1-token /v1/completions per path, interleaved, "
                  f"torch threads {torch.get_num_threads()} (driver)",
                  ["path", "p50 latency", "p50 engine", "p50 overhead", "p95 overhead", "p95 latency"], rows)
    ray_over = summary["ray serve"]["overhead_p50_ms"]
    app_over = summary["in-process"]["overhead_p50_ms"]
    direct_over = summary["direct"]["overhead_p50_ms"]
    print(f"\nHTTP gateway overhead (ray serve, p50 of latency - engine): {ray_over:.2f} ms")
    print(f"  of which the FastAPI app + ModelServer wrapper (in-process p50 overhead): {app_over:.2f} ms "
          f"(ModelServer.generate alone: {direct_over:.2f} ms)")
    print(f"  Ray proxy + handles + process hops (difference): {ray_over - app_over:.2f} ms")
    print(f"CPU share of processes other than this driver during the timed loop: {meter.foreign:.0%} "
          "(includes this run's own Ray processes: proxy, replicas, controller)")
    C.print_json({"benchmark": "gateway_overhead", "torch_threads": torch.get_num_threads(),
                  "requests": args.requests, "paths": summary, "ray_overhead_p50_ms": ray_over,
                  "app_overhead_p50_ms": app_over, "ray_minus_app_ms": ray_over - app_over,
                  "other_cpu": meter.foreign})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50, help="timed requests per path (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed requests per path first (default 5)")
    args = ap.parse_args()
    C.setup_threads()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
