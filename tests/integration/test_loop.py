"""The whole loop, for real: `tsugiki demo --quick --restart-controller` on the default model and Ray Serve.

One run checks the issue's bars together: the refreshed version ends stable and the old one retired; the
controller killed mid-rollout comes back and continues the same rollout with no feedback lost; a candidate
corrupted after the gate is rolled back automatically, and the run reports how much traffic it answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


def test_demo_loop_promotes_rolls_back_and_survives_a_controller_restart(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    log = tmp_path / "demo.log"
    cmd = [sys.executable, "-m", "tsugiki.cli", "demo", "--quick", "--restart-controller", "--home", str(home),
           "--port", str(free_port())]
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=2400,
                              env={**os.environ, "RAY_ADDRESS": ""})
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    s = json.loads((home / "summary.json").read_text())

    # the loop: drift detected, a refresh tuned and gated a candidate, the rollout promoted it
    assert s["drift"]["requests_after_shift"] > 0
    assert s["refresh"]["state"] == "done" and s["refresh"]["gate"]["passed"]
    v2 = s["refresh"]["candidate"]
    assert s["versions"]["support@v1"] == "retired" and s["versions"][v2] == "stable"
    assert s["rollout"]["state"] == "promoted" and s["rollout"]["routes"] == {v2: 1.0}
    # it learned the new domains without forgetting the old ones
    assert s["accuracy_new_after"] >= s["accuracy_new_before"] + 0.1  # --quick tunes briefly
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
    assert "tsugiki demo: summary" in out and "corrupted candidate" in out
