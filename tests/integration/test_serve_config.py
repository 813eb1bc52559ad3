"""Ray's own `serve run` on the config file in deploy/ brings up the same application."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port, stop, wait_for, wait_ready

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_serve_run_with_deploy_config(tmp_path: Path, default_model_dir: Path, real_adapters: dict[str, Path]) -> None:
    cfg = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["adapters"]["store_dir"] = str(tmp_path / "store")
    app["args"]["monitor"]["state_dir"] = str(tmp_path / "monitor")
    app["args"]["adapters"]["roots"] = [str(next(iter(real_adapters.values())).parent)]
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    llm["num_replicas"] = 2  # replica count and resources come from the config
    llm["ray_actor_options"]["num_cpus"] = 0.5  # two replicas plus the gateway fit on a 2-core machine
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    # Ray's `serve` CLI sits beside this interpreter (the venv need not be activated, as in .ci/run)
    beside = Path(sys.executable).parent / "serve"
    serve_bin = str(beside) if beside.is_file() else shutil.which("serve")
    assert serve_bin, "Ray's `serve` CLI is missing: pip install 'ray[serve]'"
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([serve_bin, "run", str(tmp_path / "serve.yaml")], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        r = httpx.post(f"{url}/v1/adapters", json={"name": "a", "path": str(real_adapters["lora0"])}, timeout=120)
        assert r.status_code == 201, r.text
        # every replica serves the adapter loaded through one of them (shared store, load on first use)
        for _ in range(6):
            r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text

        def replicas() -> set[str]:
            text = httpx.get(f"{url}/metrics", timeout=30).text
            return {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("tsugiki_running_sequences{")}

        wait_for(lambda: len(replicas()) == 2, timeout=30)  # both replicas report through one /metrics
    finally:
        stop(proc)
