"""Prometheus metrics of the gateway and the engine, and merging of per-replica expositions.

Every metric is created once, at construction, with the ``tsugiki_`` prefix and bounded labels: ``adapter``
values are adapter names from the store or the base model's name (unknown names are counted as
``"unknown"``), ``outcome`` is one of a fixed set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

OUTCOMES = ("success", "client_error", "server_error", "aborted")


class GatewayMetrics:
    """Request-level metrics, recorded by the HTTP front where each request starts and ends."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("tsugiki_requests", "Inference requests by model (base or adapter) and outcome.",
                                ["adapter", "outcome"], registry=registry)
        self.latency = Histogram("tsugiki_request_latency_seconds", "End-to-end inference request latency.",
                                 ["adapter"], buckets=_LATENCY, registry=registry)
        self.ttft = Histogram("tsugiki_time_to_first_token_seconds", "Time from request arrival to the first token.",
                              ["adapter"], buckets=_LATENCY, registry=registry)
        self.tpot = Histogram("tsugiki_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request.",
                              ["adapter"], buckets=_STEP, registry=registry)
        self.prompt_tokens = Counter("tsugiki_prompt_tokens", "Prompt tokens processed.", ["adapter"],
                                     registry=registry)
        self.completion_tokens = Counter("tsugiki_completion_tokens", "Completion tokens generated.", ["adapter"],
                                         registry=registry)
        self.adapter_ops = Counter("tsugiki_adapter_operations", "Adapter management operations by kind and outcome.",
                                   ["op", "outcome"], registry=registry)
        for op in ("load", "unload"):  # present at 0, so the first failure is an increase alerts can see
            for outcome in ("success", "error"):
                self.adapter_ops.labels(op, outcome)


class EngineMetrics:
    """Engine-level metrics, recorded by each model replica."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.batch_size = Histogram("tsugiki_batch_size", "Sequences per decode forward pass.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.queue_depth = Gauge("tsugiki_queue_depth", "Requests waiting for a batch slot.", registry=registry)
        self.running = Gauge("tsugiki_running_sequences", "Sequences in the running batch.", registry=registry)
        self.adapters_loaded = Gauge("tsugiki_adapters_loaded", "Adapter versions resident in memory.",
                                     registry=registry)
        self.adapter_load_seconds = Histogram("tsugiki_adapter_load_seconds",
                                              "Time to make a stored adapter servable (read, check, install).",
                                              buckets=_STEP, registry=registry)
        self.prefill_seconds = Histogram("tsugiki_prefill_seconds", "Prefill forward pass time.", buckets=_STEP,
                                         registry=registry)
        self.decode_seconds = Histogram("tsugiki_decode_step_seconds", "Decode forward pass time.", buckets=_STEP,
                                        registry=registry)
        self.corrected_words = Counter("tsugiki_corrected_words",
                                       "Words of requests that an adapter's lexicon corrected before the model read "
                                       "them (adapters/lexicon.py).", ["adapter"], registry=registry)


class MergedExpositions(Collector):
    """Re-exports text expositions of other processes (model replicas), each sample labelled with its source.

    Families with the same name from several sources are merged into one family, so the result stays valid
    exposition format.
    """

    def __init__(self, source: Any) -> None:
        # source() -> {replica_id: exposition_text}
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from merge_expositions(self._source())


def merge_expositions(texts: dict[str, str]) -> Iterable[Metric]:
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
    return merged.values()
