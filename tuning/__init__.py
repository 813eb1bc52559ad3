"""Tuning: the Ray job that produces robust adapters, with its regression gate (issue 4)."""
