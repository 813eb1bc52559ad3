"""Monitoring on the real gateway: clean then drifted CLINC150 traffic raises a drift alarm visible in /metrics
and the events endpoint; noisy input is flagged in a response header and counted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port, metric, stop, wait_for, wait_ready

pytestmark = pytest.mark.integration
BASE = "SmolLM2-135M-Instruct"
SUBSET = Path(__file__).resolve().parents[1] / "data" / "clinc150" / "subset.json"


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[str]:
    work = tmp_path_factory.mktemp("monitored")
    port = free_port()
    cfg = {"adapters": {"store_dir": str(work / "store")}, "engine": {"prompt_perplexity_sample": 0.1},
           # A small reference so the test is short. With 50 calibration points, ert_over='references' lowers the
           # threshold a lot (it holds the ERT on average over reference draws, and a typical draw then alarms
           # every ~500 requests); 'stream' keeps a false alarm before the shift unlikely (~1% at ERT 5000).
           "monitor": {"state_dir": str(work / "monitor"),
                       "drift": {"ert": 5000, "reference_size": 100, "ert_over": "stream"}}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "gateway.log"
    proc = subprocess.Popen([sys.executable, "-m", "tsugiki.cli", "serve", "--port", str(port), "--config",
                             str(work / "cfg.yaml")], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop(proc)


def _send(url: str, texts: list[str]) -> None:
    with httpx.Client(timeout=120) as c:
        for t in texts:
            r = c.post(url + "/v1/completions", json={"model": BASE, "prompt": t, "max_tokens": 1})
            assert r.status_code == 200, r.text


def test_drift_alarm_after_domain_shift(gateway_url: str) -> None:
    data = json.loads(SUBSET.read_text())
    doms = data["domains"]
    old = set(doms["banking"]) | set(doms["travel"])
    rng = random.Random(0)  # the splits are grouped by intent: sample across all of them
    ref = rng.sample([t for t, i in data["train"] if i in old], 100)
    clean = rng.sample([t for t, i in data["test"] if i in old], 50)
    shifted = rng.sample([t for t, i in data["train"] + data["test"] if i not in old], 150)
    _send(gateway_url, ref)
    wait_for(lambda: metric(gateway_url, "tsugiki_drift_reference_ready", adapter=BASE) == 1.0)
    _send(gateway_url, clean)
    wait_for(lambda: metric(gateway_url, "tsugiki_monitor_observations_total", adapter=BASE) >= 150)
    assert metric(gateway_url, "tsugiki_drift_alarm", adapter=BASE) == 0.0
    # prompt perplexity is measured on a sampled share (10% here) of the 150 requests so far
    n_ppl = metric(gateway_url, "tsugiki_prompt_perplexity_count", adapter=BASE)
    assert 3 <= n_ppl <= 40
    assert metric(gateway_url, "tsugiki_prompt_perplexity_sum", adapter=BASE) / n_ppl > 1.0
    status = httpx.get(f"{gateway_url}/v1/monitor/adapters/{BASE}", timeout=30).json()
    assert status["state"] == "monitoring" and status["requests_seen"] >= 50
    # the replicas' noise scores reached the monitor: the first 100 made the noise channel's reference
    assert status["noise_reference"] == "ready" and status["noise_threshold"] > 0
    assert metric(gateway_url, "tsugiki_drift_noise_threshold", adapter=BASE) == status["noise_threshold"]
    _send(gateway_url, shifted)
    wait_for(lambda: metric(gateway_url, "tsugiki_drift_alarm", adapter=BASE) == 1.0)
    assert metric(gateway_url, "tsugiki_drift_alarms_total", adapter=BASE) >= 1
    assert metric(gateway_url, "tsugiki_drift_threshold", adapter=BASE) > 0
    events = httpx.get(f"{gateway_url}/v1/monitor/events", timeout=30).json()["data"]
    ev = events[0]
    assert ev["adapter"] == BASE and ev["example_request_ids"] and ev["window"]["mean_z"] > 0
    assert httpx.get(f"{gateway_url}/v1/monitor/adapters/{BASE}", timeout=30).json()["alarm"] is True
    assert httpx.get(f"{gateway_url}/v1/monitor/adapters/nope", timeout=30).status_code == 404


def test_noisy_input_is_flagged_in_a_header_and_counted(gateway_url: str) -> None:
    garbled = "whÃ¤t is my chÃ©cking accÃ¶unt balance â€” pleÃ¡se"
    r = httpx.post(gateway_url + "/v1/completions", timeout=120,
                   json={"model": BASE, "prompt": garbled, "max_tokens": 1})
    assert r.status_code == 200
    assert "encoding_garbage" in r.headers["x-tsugiki-noise-reasons"]
    assert float(r.headers["x-tsugiki-noise-score"]) >= 1.0
    clean = httpx.post(gateway_url + "/v1/completions", timeout=120,
                       json={"model": BASE, "prompt": "what is my checking account balance", "max_tokens": 1})
    assert clean.headers["x-tsugiki-noise-reasons"] == "none"
    wait_for(lambda: metric(gateway_url, "tsugiki_noisy_requests_total", adapter=BASE, reason="encoding_garbage") >= 1)
    assert metric(gateway_url, "tsugiki_output_confidence_logprob_count", adapter=BASE) >= 2
