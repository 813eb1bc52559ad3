"""Integration fixtures: the real default model, a real gateway process (`tsugiki serve`, Ray Serve over HTTP)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import make_lora, metric_value

API_KEY = "it-user-key"
ADMIN_KEY = "it-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"gateway not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def wait_for(pred, timeout: float = 60.0) -> None:
    """Poll ``pred`` until it holds (state in another process: metrics pushed every 2 s, batches every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


def metric(url: str, name: str, **labels: str) -> float:
    return metric_value(httpx.get(url + "/metrics", timeout=30).text, name, **labels)


def stop(proc: subprocess.Popen) -> None:
    """Stop a `tsugiki serve` as a supervisor would: SIGTERM to it alone, so it shuts Ray Serve and Ray down
    itself (SIGTERM to its whole process group also killed Ray's own processes under it, and Serve then waited
    30 s for them); then whatever is left of its group is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of the group (nothing, after a clean shutdown)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from tsugiki.serve.base_model import convert_default_model

    return convert_default_model(progress=False)


@pytest.fixture(scope="session")
def real_adapters(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Rank-8 all-linear LoRA adapters of the real default model, with random non-zero weights."""
    root = tmp_path_factory.mktemp("incoming")
    return {f"lora{i}": make_lora(default_model_dir, root / f"lora{i}", seed=i, scale=0.05) for i in range(3)}


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen
    log: Path
    store: Path
    roots: Path

    def client(self, key: str = API_KEY):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120,
                             **kw)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path,
            real_adapters: dict[str, Path]) -> Iterator[Gateway]:
    """`tsugiki serve` in a subprocess, as a user would run it, with keys and a private adapter store."""
    work = tmp_path_factory.mktemp("gateway")
    port = free_port()
    roots = next(iter(real_adapters.values())).parent
    cfg = {"adapters": {"roots": [str(roots)]}, "engine": {"max_batch_size": 16},
           "monitor": {"state_dir": str(work / "monitor")},
           "server": {"api_keys": [API_KEY], "admin_key": ADMIN_KEY, "log_level": "WARNING"}}
    (work / "tsugiki.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "gateway.log"
    env = {**os.environ, "TSUGIKI_ENGINE__DEFAULT_MAX_TOKENS": "64"}
    cmd = [sys.executable, "-m", "tsugiki.cli", "serve", "--port", str(port), "--config", str(work / "tsugiki.yaml"),
           "--adapter-dir", str(work / "store")]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    gw = Gateway(f"http://127.0.0.1:{port}", proc, log, work / "store", roots)
    try:
        wait_ready(gw.url, proc, log)
        yield gw
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("the `prometheus` server is not installed; .ci/run installs it (apt-get install prometheus)")
    return path
