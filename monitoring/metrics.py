"""Prometheus metrics of request quality (recorded by model replicas) and drift (recorded by the monitor).

Labels are bounded: ``adapter`` is an adapter name from the store or the base model's name, ``reason`` one of
:data:`tsugiki.monitoring.noise.REASONS`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LOGPROB = (-8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0)


class RequestQualityMetrics:
    """Per-request signals, counted where the request is served (never lost with the monitor)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.noisy = Counter("tsugiki_noisy_requests", "Requests flagged as noisy, by adapter and reason.",
                             ["adapter", "reason"], registry=registry)
        self.noise_score = Histogram("tsugiki_noise_score", "Noise score per request (>= 1 means flagged).",
                                     ["adapter"], buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
                                     registry=registry)
        self.output_confidence = Histogram("tsugiki_output_confidence_logprob",
                                           "Mean log-probability of a request's output tokens.", ["adapter"],
                                           buckets=_LOGPROB, registry=registry)
        self.prompt_perplexity = Histogram("tsugiki_prompt_perplexity",
                                           "Perplexity of a request's prompt under the served model (adapter "
                                           "applied); measured on a sampled share of requests.", ["adapter"],
                                           buckets=(2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000), registry=registry)
        self.shipped = Counter("tsugiki_monitor_observations_shipped", "Request observations sent to the monitor.",
                               registry=registry)
        self.dropped = Counter("tsugiki_monitor_observations_dropped",
                               "Request observations dropped because the monitor was unreachable or behind.",
                               registry=registry)


class DriftMetrics:
    """Drift state per adapter, exported by the monitor."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.score = Gauge("tsugiki_drift_score", "Current CUSUM statistic of the adapter's drift detector.",
                           ["adapter"], registry=registry)
        self.threshold = Gauge("tsugiki_drift_threshold", "CUSUM threshold (from the configured ERT).", ["adapter"],
                               registry=registry)
        self.noise_score = Gauge("tsugiki_drift_noise_score",
                                 "Current CUSUM statistic over the requests' noise-score ranks (dense noise).",
                                 ["adapter"], registry=registry)
        self.noise_threshold = Gauge("tsugiki_drift_noise_threshold",
                                     "Threshold of the noise-score CUSUM (its share of the configured ERT).",
                                     ["adapter"], registry=registry)
        self.alarm = Gauge("tsugiki_drift_alarm", "1 while a drift alarm on the adapter is active (until reset).",
                           ["adapter"], registry=registry)
        self.alarms = Counter("tsugiki_drift_alarms", "Drift alarms raised.", ["adapter"], registry=registry)
        self.reference = Gauge("tsugiki_drift_reference_ready",
                               "Share of the reference profile collected (1 = detector running).", ["adapter"],
                               registry=registry)
        self.observations = Counter("tsugiki_monitor_observations", "Request observations processed by the monitor.",
                                    ["adapter"], registry=registry)
