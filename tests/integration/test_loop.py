"""The whole loop, for real, watched the way ops would watch it.

One run of `tsugiki demo --quick --restart-controller` (the default model on Ray Serve) with a real Prometheus
scraping its gateway (deploy/prometheus: the shipped config, rules and alerts, only the targets pointed at this
machine) and a real Alertmanager (deploy/alertmanager, its webhook pointed at this gateway). The tests then check:

* the issue-5 bars: the refreshed version ends stable and the old one retired; the controller killed mid-rollout
  continues the same rollout with no feedback lost; a candidate corrupted after the gate is rolled back
  automatically, and the run reports how much traffic it answered;
* the issue-6 live bars: every PromQL expression of every panel of every dashboard in deploy/grafana returned
  data during the run (a failure names the panel); the drift alert fired in Prometheus; Alertmanager's webhook
  reached the gateway and the controller logged it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port, wait_for

# The module's fixture runs `tsugiki demo --quick`: about 9-10 minutes on the 2 cores it was written on, more than
# 25 on the AVX2-only 2-core hosts of sessions 19-20 (the refresh alone ~740 s; 1500 s ran out in its last stage,
# after the promotion). Its own budget instead of the project-wide 600 s, under the fixture's 2400 s subprocess
# timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2100)]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@dataclass
class Run:
    summary: dict[str, Any]
    log: str
    home: Path
    prometheus: str
    start: float
    end: float

    def query_range(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query_range", timeout=30,
                      params={"query": expr, "start": self.start, "end": self.end, "step": 15})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])


def _alertmanager_bin() -> str:
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if path is None:
        pytest.fail("Alertmanager is not installed; .ci/run installs it (apt-get install prometheus-alertmanager)")
    return path


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prometheus_bin: str) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("loop")
    port, prom_port, am_port = free_port(), free_port(), free_port()
    gateway = f"127.0.0.1:{port}"

    # Alertmanager: the shipped routing, its gateway webhook pointed here, the admin key from a file
    (work / "admin-key").write_text("demo-admin")
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    for rcv in am["receivers"]:
        for hook in rcv.get("webhook_configs", []):
            if hook["url"].endswith("/v1/alerts/alertmanager"):
                hook["url"] = f"http://{gateway}/v1/alerts/alertmanager"
                hook["http_config"]["authorization"]["credentials_file"] = str(work / "admin-key")
    (work / "alertmanager.yml").write_text(yaml.safe_dump(am))
    # Prometheus: the shipped config and rules, targets on this machine
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prom["rule_files"] = [str(p) for p in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))]
    prom["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
    for job in prom["scrape_configs"]:
        if job["job_name"] == "tsugiki":
            job["static_configs"] = [{"targets": [gateway]}]
    prom["scrape_configs"] = [j for j in prom["scrape_configs"] if j["job_name"] == "tsugiki"]  # no Ray node here
    (work / "prometheus.yml").write_text(yaml.safe_dump(prom))

    procs = [
        _start([_alertmanager_bin(), f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={work / 'am'}",
                f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="], work / "am.log"),
        _start([prometheus_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}"], work / "prom.log"),
    ]
    try:
        prom_url = f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: _ok(f"{prom_url}/-/ready") and _ok(f"http://127.0.0.1:{am_port}/-/ready"), timeout=60)
        home = work / "demo"
        log = work / "demo.log"
        start = time.time()
        cmd = [sys.executable, "-m", "tsugiki.cli", "demo", "--quick", "--restart-controller", "--home", str(home),
               "--port", str(port)]
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=2400,
                                  env={**os.environ, "RAY_ADDRESS": ""})
        end = time.time()
        text = log.read_text()
        assert proc.returncode == 0, text[-6000:]
        yield Run(json.loads((home / "summary.json").read_text()), text, home, prom_url, start, end)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_loop_promotes_rolls_back_and_survives_a_controller_restart(run: Run) -> None:
    s = run.summary
    # the loop: drift detected, a refresh tuned and gated a candidate, the rollout promoted it
    assert s["drift"]["requests_after_shift"] > 0
    assert s["refresh"]["state"] == "done" and s["refresh"]["gate"]["passed"]
    v2 = s["refresh"]["candidate"]
    assert s["versions"]["support@v1"] == "retired" and s["versions"][v2] == "stable"
    assert s["rollout"]["state"] == "promoted" and s["rollout"]["routes"] == {v2: 1.0}
    # it learned the new domains without forgetting the old ones
    assert s["accuracy_new_after"] >= s["accuracy_new_before"] + 0.2  # --quick tunes briefly (0.28-0.42 measured)
    assert s["accuracy_old_after"] >= s["accuracy_old_before"] - 0.15

    # the controller restart continued the same rollout from its recorded stage; no feedback was lost
    c = s["controller_restart"]
    assert c["rollout_after"] == c["rollout_before"] and c["stage_after"] >= c["stage_before"]
    assert c["feedback_stored_before"] == c["feedback_accepted_before"]
    assert c["feedback_stored_after"] == c["feedback_accepted_after"]

    # the corrupted candidate was rolled back automatically: caught by its shadow answers, or at the latest in
    # the first canary step, so at most that step's share of traffic ever saw it
    b = s["bad_candidate"]
    assert b["outcome"] == "rolled_back", b
    assert b["share_of_traffic_exposed"] <= 0.35 and b["evidence_requests"] >= 1, b
    assert "tsugiki demo: summary" in run.log and "corrupted candidate" in run.log


def _dashboards() -> Any:
    spec = importlib.util.spec_from_file_location("tsugiki_dashboards", DEPLOY / "grafana" / "dashboards.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_dashboard_panel_returned_data(run: Run) -> None:
    dash = _dashboards()
    empty, checked = [], 0
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for title, expr in dash.panel_queries(board):
            checked += 1
            series = run.query_range(dash.expand_variables(expr))
            if not any(math.isfinite(float(v)) for s in series for _, v in s["values"]):
                empty.append(f"{board['title']} / {title}: {expr}")
    assert checked >= 40
    assert not empty, "panels without data during the run:\n" + "\n".join(empty)


def test_drift_alert_fired_and_alertmanager_reached_the_controller(run: Run) -> None:
    fired = run.query_range('ALERTS{alertname="TsugikiDriftDetected", alertstate="firing"}')
    assert {s["metric"].get("adapter") for s in fired} >= {"support@v1"}, fired
    from tsugiki.adapters.registry import Registry

    with Registry(run.home / "registry.db") as reg:
        alerts = [e for e in reg.events(kind="alert", limit=10_000) if e.actor == "alertmanager"]
    assert any(e.payload["alertname"] == "TsugikiDriftDetected" and e.payload["status"] == "firing"
               and e.alias == "support" for e in alerts), [e.payload for e in alerts]
