"""Starting Ray Serve on a loaded machine: when ``serve.start`` gives up on its HTTP proxy (the controller it
started keeps restarting it), :func:`start_serve` waits until the proxy answers HTTP, for a bounded time. No Ray
cluster: ``serve.start`` and the HTTP probe are replaced."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from tsugiki.serve import deployments


class FakeServe:
    """``serve.start`` raising the given errors in turn, then returning; ``probe`` answers after ``down`` tries."""

    def __init__(self, failures: list[BaseException], down: int) -> None:
        self.failures, self.down = failures, down
        self.starts: list[dict[str, Any]] = []
        self.probes: list[str] = []

    def start(self, http_options: dict[str, Any]) -> None:
        self.starts.append(http_options)
        if self.failures:
            raise self.failures.pop(0)

    def probe(self, url: str, timeout: float, trust_env: bool) -> httpx.Response:
        assert not trust_env  # a local probe never goes through the environment's HTTP proxy
        self.probes.append(url)
        if len(self.probes) <= self.down:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(503)  # up, before its first route table: still an answer


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(failures: list[BaseException], down: int = 0) -> FakeServe:
        f = FakeServe(failures, down)
        monkeypatch.setattr(serve, "start", f.start)
        monkeypatch.setattr(httpx, "get", f.probe)
        monkeypatch.setattr(deployments.time, "sleep", lambda s: None)
        return f
    return make


def test_a_proxy_that_starts_in_time_is_not_probed(fake: Any) -> None:
    f = fake([])
    deployments.start_serve({"host": "127.0.0.1", "port": 1})
    assert f.starts == [{"host": "127.0.0.1", "port": 1}] and f.probes == []


@pytest.mark.parametrize("error", [ray.exceptions.RayActorError(), TimeoutError("HTTP proxies not available")])
def test_a_proxy_serve_start_gave_up_on_is_waited_for_over_http(fake: Any, error: BaseException,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    f = fake([error], down=3)
    deployments.start_serve({"host": "0.0.0.0", "port": 8123})
    assert len(f.starts) == 2  # the second connects to the running controller, for serve.run
    assert f.probes == ["http://127.0.0.1:8123/-/healthz"] * 4
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "Ray Serve's HTTP proxy did not come up in serve.start"]


def test_a_proxy_that_never_answers_is_an_error_naming_where_to_look(fake: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    f = fake([TimeoutError("late")], down=10**6)
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(deployments.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(TimeoutError, match=r"did not answer on http://h:9/-/healthz within 30 s; its log is under"):
        deployments.start_serve({"host": "h", "port": 9}, timeout_s=30)
    assert 1 < len(f.probes) < 10


def test_other_errors_are_not_waited_on(fake: Any) -> None:
    f = fake([ValueError("bad http_options")])
    with pytest.raises(ValueError, match="bad http_options"):
        deployments.start_serve({})
    assert len(f.starts) == 1 and f.probes == []


def test_init_ray_gives_a_cluster_it_starts_a_longer_proxy_readiness_timeout(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    var = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    monkeypatch.setenv(var, "placeholder")  # monkeypatch now restores the session's own value (or its absence)
    monkeypatch.delenv(var)
    seen: list[str | None] = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get(var)))
    deployments.init_ray(num_cpus=1)
    os.environ[var] = "7"  # the user's own setting wins
    deployments.init_ray(num_cpus=1)
    assert seen == [deployments.PROXY_READY_CHECK_TIMEOUT_S, "7"]
