"""Adapter hot-load latency: from an adapter directory on disk to servable, through ``ModelServer.load_adapter``.

An in-process :class:`~tsugiki.serve.server.ModelServer` on the default base model (its engine thread running,
idle) gets ``--loads`` distinct rank-8 all-linear PEFT adapters, one after another; each
``await server.load_adapter(name, path)`` is timed end to end: validate against the base model (read the
safetensors, check shapes), copy into the adapter store as a new version (content digest, fsync'd index), then
install the weights into the engine's LoRA layers on the engine thread. A warm-up load (one more adapter) runs
first and is reported separately.

Per adapter, interleaved with its hot load, two more timings:

* ``first use``: evict the adapter from the engine and time ``EngineCore.ensure_resident(ref)`` on the engine
  thread: what the first request for an adapter that is in the store but not in memory pays (read + validate
  from the store copy + install).
* ``raw read``: ``safetensors.torch.load_file`` of the same adapter file: the floor any loader pays.

The phases of each hot load (read+validate, store.put, install on the engine thread) are timed by wrapping the
server's own methods on the instance; no project file is changed.

``adapters.max_loaded`` defaults to ``--loads + 1`` (every adapter stays resident, no eviction during the
hot loads); pass a small ``--max-loaded`` to include LRU eviction in the measured path.

Run: ``python benchmarks/adapter_hot_load.py [--loads 20] [--rank 8] [--max-loaded N]``
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import torch


def timed(store: dict[str, float], key: str, fn: Any) -> Any:
    """Wrap ``fn`` so that its last duration lands in ``store[key]``."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            store[key] = time.perf_counter() - t0

    return wrapper


async def run(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from tsugiki.config import load_settings
    from tsugiki.serve.server import ModelServer

    base_dir = C.default_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="tsugiki-bench-hotload-"))
    src_root, store_dir = tmp / "src", tmp / "store"
    n_total = args.loads + 1
    C.log(f"making {n_total} distinct rank-{args.rank} all-linear adapters under {src_root}")
    adapters = C.make_adapters(base_dir, src_root, n_total, r=args.rank, alpha=2 * args.rank, seed=5000,
                               prefix="hot")
    size_mb = (adapters[0][1] / "adapter_model.safetensors").stat().st_size / 2**20
    max_loaded = args.max_loaded or n_total
    settings = load_settings(adapters={"store_dir": str(store_dir), "roots": [str(src_root)],
                                       "max_loaded": max_loaded})
    C.log(f"starting ModelServer (adapters.max_loaded={max_loaded}, store {store_dir})")
    server = ModelServer(settings)
    C.log(f"server up; torch threads in server: {server.torch_threads}")
    core = server.core

    phase: dict[str, float] = {}
    core.read_adapter = timed(phase, "read_validate", core.read_adapter)  # type: ignore[method-assign]
    server.store.put = timed(phase, "store_put", server.store.put)  # type: ignore[method-assign]
    core.sync_store = timed(phase, "sync_store", core.sync_store)  # type: ignore[method-assign]
    core.ensure_resident = timed(phase, "install", core.ensure_resident)  # type: ignore[method-assign]

    def first_use(ref: Any) -> float:
        """On the engine thread: drop ``ref`` from memory, then time loading it back from the store."""
        if ref in core.cache:
            core.cache.remove(ref)
        t0 = time.perf_counter()
        ok = core.ensure_resident(ref)
        dt = time.perf_counter() - t0
        if not ok:
            raise RuntimeError("ensure_resident refused: every slot is pinned")
        return dt

    samples: list[dict[str, Any]] = []
    for i, (name, path) in enumerate(adapters):
        phase.clear()
        with C.CpuMeter() as m:
            t0 = time.perf_counter()
            rec = await server.load_adapter(name, str(path))
            hot = time.perf_counter() - t0
        parts = dict(phase)
        ref = server.store.resolve(name)
        assert ref is not None and rec["version"] == ref.version
        if ref not in core.cache:
            raise RuntimeError(f"{name} is not resident right after load_adapter")
        fu = await server.engine.call(lambda ref=ref: first_use(ref))
        t0 = time.perf_counter()
        load_file(str(path / "adapter_model.safetensors"))
        raw = time.perf_counter() - t0
        s = {"name": name, "hot_ms": hot * 1e3, "first_use_ms": fu * 1e3, "raw_read_ms": raw * 1e3,
             "other_cpu": m.foreign, **{f"{k}_ms": v * 1e3 for k, v in parts.items()}}
        # install_ms is the ensure_resident call alone; the rest of the engine-thread hop is in 'other'
        s["other_ms"] = s["hot_ms"] - sum(s.get(k, 0.0) for k in ("read_validate_ms", "store_put_ms",
                                                                   "sync_store_ms", "install_ms"))
        C.log(f"{'warm-up ' if i == 0 else ''}load {i:2d} {name}: hot {s['hot_ms']:6.1f} ms "
              f"(read+validate {s.get('read_validate_ms', 0):5.1f}, store.put {s.get('store_put_ms', 0):5.1f}, "
              f"install {s.get('install_ms', 0):5.1f})  first-use {s['first_use_ms']:5.1f} ms  "
              f"raw read {s['raw_read_ms']:5.1f} ms  other-CPU {m.foreign:.0%}")
        samples.append(s)
    resident = len(core.cache)
    server.shutdown()

    warm, timed_samples = samples[0], samples[1:]

    def col(key: str) -> list[float]:
        return [s.get(key, 0.0) for s in timed_samples]

    rows, summary = [], {}
    labels = [("hot_ms", "hot load (load_adapter, end to end)"), ("read_validate_ms", "  read + validate"),
              ("store_put_ms", "  store.put (copy, digest, index)"), ("sync_store_ms", "  sync_store (engine thread)"),
              ("install_ms", "  install (ensure_resident w/ weights)"), ("other_ms", "  other (thread hops, lookups)"),
              ("first_use_ms", "first-use load (ensure_resident from store)"),
              ("raw_read_ms", "raw safetensors read (floor)")]
    raw_p50 = C.pct(col("raw_read_ms"), 50)
    for key, label in labels:
        xs = col(key)
        p50, p95 = C.pct(xs, 50), C.pct(xs, 95)
        summary[key] = {"p50": p50, "p95": p95, "min": min(xs), "max": max(xs), "warmup": warm.get(key, 0.0)}
        rows.append([label, p50, p95, min(xs), max(xs), warm.get(key, 0.0), p50 / raw_p50 if raw_p50 else float("nan")])
    C.print_table(f"adapter hot-load latency (ms): {args.loads} distinct rank-{args.rank} all-linear adapters of the "
                  f"default model ({size_mb:.1f} MiB each), adapters.max_loaded={max_loaded}, torch threads "
                  f"{torch.get_num_threads()}",
                  ["what", "p50", "p95", "min", "max", "warm-up load", "p50 x raw read"], rows)
    hot_p50 = summary["hot_ms"]["p50"]
    fg = [s["other_cpu"] for s in timed_samples]
    print(f"\nhot-load p50 {hot_p50:.1f} ms -> bar p50 <= 100 ms: {'PASS' if hot_p50 <= 100 else 'FAIL'}")
    print(f"other processes' share of the CPUs during hot loads: median {C.median(fg):.0%}, max {max(fg):.0%}")
    print(f"adapters resident at the end: {resident} (max_loaded {max_loaded})")
    C.print_json({"benchmark": "adapter_hot_load", "torch_threads": torch.get_num_threads(), "loads": args.loads,
                  "rank": args.rank, "adapter_mib": size_mb, "max_loaded": max_loaded, "summary": summary,
                  "hot_p50_ms": hot_p50, "hot_p95_ms": summary["hot_ms"]["p95"], "bar_pass": hot_p50 <= 100,
                  "first_use_p50_ms": summary["first_use_ms"]["p50"], "other_cpu_median": C.median(fg)})
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=int, default=20, help="timed hot loads of distinct adapters (default 20)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank; default 8)")
    ap.add_argument("--max-loaded", type=int, default=0,
                    help="adapters.max_loaded for the server (default: loads + 1, i.e. no eviction)")
    args = ap.parse_args()
    C.setup_threads()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
