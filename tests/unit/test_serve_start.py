"""Starting Ray Serve on a loaded machine: a proxy that dies or is late before its first readiness check is
waited for again, a bounded number of times (no Ray cluster: ``serve.start`` is replaced)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import ray
from ray import serve

from tsugiki.serve import deployments


def _flaky(failures: list[BaseException], calls: list[dict[str, Any]]) -> Any:
    def start(http_options: dict[str, Any]) -> None:
        calls.append(http_options)
        if failures:
            raise failures.pop(0)
    return start


def test_start_serve_waits_again_for_a_proxy_that_died_or_was_late(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    calls: list[dict[str, Any]] = []
    failures: list[BaseException] = [ray.exceptions.RayActorError(), TimeoutError("HTTP proxies not available")]
    monkeypatch.setattr(serve, "start", _flaky(failures, calls))
    deployments.start_serve({"host": "127.0.0.1", "port": 1})
    assert calls == [{"host": "127.0.0.1", "port": 1}] * 3
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["Ray Serve's HTTP proxy did not come up"] * 2


def test_start_serve_gives_up_after_its_attempts_and_does_not_retry_other_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve, "start", _flaky([TimeoutError("late")] * 5, calls))
    with pytest.raises(TimeoutError, match="late"):
        deployments.start_serve({}, attempts=2)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(serve, "start", _flaky([ValueError("bad http_options")], calls))
    with pytest.raises(ValueError, match="bad http_options"):
        deployments.start_serve({})
    assert len(calls) == 1


def test_init_ray_gives_a_cluster_it_starts_a_longer_proxy_readiness_timeout(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    seen: list[str | None] = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")))
    monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", raising=False)
    deployments.init_ray(num_cpus=1)
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "7")  # the user's own setting wins
    deployments.init_ray(num_cpus=1)
    assert seen == [deployments.PROXY_READY_CHECK_TIMEOUT_S, "7"]
