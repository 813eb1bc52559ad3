"""What monitoring adds to request latency: the same requests through a model server with monitoring on and
one with it off, interleaved in one run.

    python benchmarks/monitor_overhead.py [--requests 300]

"On" does everything the served path does: noise scoring in the request, prompt-feature pooling at prefill,
output-confidence bookkeeping, and shipping observations in batches to a Monitor running in another process
(as the Monitor deployment does under Ray). "Off" is the same server with ``monitor.enabled = false``.
Both load the default model; requests are CLINC150 test queries (the subset shipped with the tests),
``max_tokens=1``, sent one at a time, each query to every server in turn (the order rotating).

Two servers differ by more than their settings (each has its own copy of the model in memory), and on these
machines that difference alone moved the p50 by -0.6 to +1.8 ms between runs. So a third server, "off2", also
has monitoring off: ``off2 - off`` is the A/A floor of the same run. Beside the p50 difference the benchmark
reports the median of the per-query differences (each query's latency on one server minus on the other: the
query's own length cancels) with a bootstrap 95% interval, for ``on - off`` and for ``off2 - off``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SUBSET = Path(__file__).resolve().parents[1] / "tests" / "data" / "clinc150" / "subset.json"
_MONITOR: Any = None


def _init_monitor(state_dir: str) -> None:
    global _MONITOR
    from tsugiki.monitoring.monitor import Monitor, MonitorConfig

    _MONITOR = Monitor(MonitorConfig(state_dir=Path(state_dir), drift={"reference_size": 200}))


def _observe(batch: list[dict[str, Any]]) -> int:
    return int(_MONITOR.observe(batch))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> None:
    import tempfile

    from tsugiki.config import load_settings
    from tsugiki.monitoring.noise import NoiseDetector
    from tsugiki.serve.base_model import load_base_model, set_torch_threads
    from tsugiki.serve.server import ModelServer

    log(f"torch.get_num_threads() = {set_torch_threads(0)}")
    tmp = Path(tempfile.mkdtemp(prefix="tsugiki-monbench-"))
    pool = ProcessPoolExecutor(max_workers=1, initializer=_init_monitor, initargs=(str(tmp / "monitor"),))
    loop = asyncio.get_running_loop()

    async def sink(batch: list[dict[str, Any]]) -> None:
        await loop.run_in_executor(pool, _observe, batch)

    servers = {}
    for name, enabled in (("on", True), ("off", False), ("off2", False)):
        s = load_settings(adapters={"store_dir": str(tmp / f"store-{name}")}, monitor={"enabled": enabled})
        servers[name] = ModelServer(s, loaded=load_base_model(s.model, progress=True),
                                    monitor_sink=sink if enabled else None)
    texts = [t for t, _ in json.loads(SUBSET.read_text())["test"]]
    lat: dict[str, list[float]] = {name: [] for name in servers}

    async def one(name: str, text: str) -> float:
        t0 = time.perf_counter()
        async for ev in servers[name].generate({"model": "SmolLM2-135M-Instruct", "prompt": text, "max_tokens": 1,
                                                "temperature": 0}):
            assert ev["type"] != "error", ev
        return time.perf_counter() - t0

    for i in range(args.warmup):
        for name in servers:
            await one(name, texts[i % len(texts)])
    log(f"timing {args.requests} requests per setting, interleaved")
    names = list(servers)
    for i in range(args.requests):
        for name in names[i % 3:] + names[:i % 3]:
            lat[name].append(await one(name, texts[i % len(texts)]))
        if (i + 1) % 100 == 0:
            log(f"  {i + 1}/{args.requests}")
    await servers["on"].shipper.flush()
    det = NoiseDetector()
    t0 = time.perf_counter()
    for t in texts:
        det.score(t)
    noise_us = (time.perf_counter() - t0) / len(texts) * 1e6

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000

    p50_on, p50_off = statistics.median(lat["on"]) * 1000, statistics.median(lat["off"]) * 1000

    def paired(a: str, b: str) -> tuple[float, float, float]:
        """Median of the per-query differences a - b (ms) and its bootstrap 95% interval."""
        d = (np.array(lat[a]) - np.array(lat[b])) * 1000
        rng = np.random.default_rng(0)
        boot = [float(np.median(d[rng.integers(0, len(d), len(d))])) for _ in range(2000)]
        return float(np.median(d)), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))

    on_off, aa = paired("on", "off"), paired("off2", "off")
    print(f"\nmonitoring overhead: {args.requests} interleaved 1-token requests per setting "
          f"(CLINC150 test queries), torch threads {servers['on'].torch_threads}")
    print(f"{'setting':10s} {'p50 ms':>8s} {'p90 ms':>8s}")
    for name in ("off", "off2", "on"):
        print(f"{name:10s} {statistics.median(lat[name]) * 1000:8.2f} {pct(lat[name], 90):8.2f}")
    print(f"p50 added by monitoring: {p50_on - p50_off:+.3f} ms  (bar: at most 1 ms); A/A (off2 - off): "
          f"{(statistics.median(lat['off2']) - statistics.median(lat['off'])) * 1000:+.3f} ms")
    print(f"per-query median difference on - off: {on_off[0]:+.3f} ms [95% {on_off[1]:+.3f}, {on_off[2]:+.3f}]; "
          f"A/A off2 - off: {aa[0]:+.3f} ms [95% {aa[1]:+.3f}, {aa[2]:+.3f}]")
    print(f"noise scoring alone: {noise_us:.0f} us per request (warm cache)")
    shipped = servers["on"].quality.shipped._value.get()
    print(f"observations shipped to the monitor process: {shipped:.0f}")
    print("RESULT_JSON " + json.dumps({"p50_on_ms": p50_on, "p50_off_ms": p50_off, "added_ms": p50_on - p50_off,
                                       "p50_off2_ms": statistics.median(lat["off2"]) * 1000,
                                       "paired_on_off_ms": on_off, "paired_aa_ms": aa,
                                       "noise_us": noise_us, "requests": args.requests, "shipped": shipped}))
    for s in servers.values():
        s.shutdown()
    pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
