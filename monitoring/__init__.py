"""Monitoring: per-request features, online drift and noisy-input detectors, Prometheus metrics (issue 3)."""
