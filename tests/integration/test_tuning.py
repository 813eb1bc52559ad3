"""A short real tuning job on Ray with the default model: killed mid-run, resumed from its checkpoint, gated,
written to the store of a running gateway, and answering the task through the OpenAI API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import API_KEY, Gateway, wait_for
from tsugiki.tuning.data import label_prompt

SUBSET = Path(__file__).resolve().parents[1] / "data" / "clinc150" / "subset.json"
pytestmark = pytest.mark.integration


def _task(tmp: Path) -> tuple[Path, list[tuple[str, str]]]:
    data = json.loads(SUBSET.read_text())
    banking = set(data["domains"]["banking"])  # 15 intents
    train = tmp / "banking.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": i}) + "\n"
                             for t, i in data["train"] + data["val"] if i in banking))
    return train, [(t, i) for t, i in data["test"] if i in banking]


def _tune(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "tsugiki.cli", "tune", *args], stdout=log.open("a"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_tune_on_ray_resume_gate_and_serve(gateway: Gateway, tmp_path: Path) -> None:
    train, test = _task(tmp_path)
    cfg = tmp_path / "tune.yaml"
    # the thresholds under test elsewhere (unit tests); here: a job that passes on 20 validation examples
    cfg.write_text(yaml.safe_dump({"epochs": 3, "num_layers": 4, "checkpoint_every": 10, "num_cpus": 1,
                                   "robust": {"denoise_layers": 6, "denoise_epochs": 1},
                                   "gate": {"max_family_drop": 0.6, "min_gain_over_base": 0.1,
                                            "min_retained_agreement": 0.1}}))
    work = tmp_path / "work"
    args = ["--data", str(train), "--name", "banking", "--config", str(cfg), "--store-dir", str(gateway.store),
            "--work-dir", str(work)]
    log = tmp_path / "tune.log"
    proc = _tune(args, log)
    # kill the whole job (driver and Ray) once a checkpoint exists
    deadline = time.monotonic() + 600
    while not list(work.glob("banking/*/checkpoint/state.json")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    first = json.loads(next(work.glob("banking/*/checkpoint/state.json")).read_text())["step"]
    assert first >= 10
    proc = _tune([*args, "--json"], log)
    assert proc.wait(900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    result = json.loads(text[text.index('{\n "name"'):])
    assert result["status"] == "written" and result["adapter"] == "banking@v1"
    assert result["card"]["train"]["resumed_from"] >= first
    assert '"event": "tune"' in text and '"eta_s"' in text  # progress lines in the job's log
    card = result["card"]
    assert card["gate"]["passed"] and card["layers"] == [26, 27, 28, 29]
    # the denoiser (layers 0-5) was saved before the kill; the rerun loaded it instead of training it again
    assert card["denoise"]["layers"] == list(range(6)) and card["denoise"]["resumed"]
    assert card["base_model_fingerprint"] and card["data"]["data_hash"]

    # the gateway picks the new store version up and answers the task with it
    client = gateway.client()
    wait_for(lambda: "banking" in {m.id for m in client.models.list().data}, timeout=60)
    right = base_right = named = 0
    labels = {i for _, i in test}
    for t, intent in test[:30]:
        out = client.completions.create(model="banking", prompt=label_prompt(t), max_tokens=8, temperature=0,
                                        stop=["\n"]).choices[0].text.strip()
        right += out == intent
        base = client.completions.create(model=gateway_base(client), prompt=label_prompt(t), max_tokens=8,
                                         temperature=0, stop=["\n"]).choices[0].text.strip()
        base_right += base == intent
        named += out in labels
    assert named >= 20, named  # the adapter answers with label names, not free text
    assert right >= 9 and right > base_right + 5, (right, base_right)
    # the adapter ships its lexicon: the gateway restores a misspelled task word before the model reads it
    raw = client.completions.with_raw_response.create(
        model="banking", prompt=label_prompt("how much money is in my checking acount"), max_tokens=8,
        temperature=0, stop=["\n"])
    assert raw.headers["x-tsugiki-corrected-words"] == "1"
    fixed = client.completions.create(model="banking", prompt=label_prompt("how much money is in my checking account"),
                                      max_tokens=8, temperature=0, stop=["\n"])
    assert raw.parse().choices[0].text == fixed.choices[0].text

    # the job shipped its tuning data's features; the replica handed them to the monitor on first use, so the
    # adapter is watched against what it was tuned on from its first request
    n_data = card["data"]["train"] + card["data"]["val"]
    assert 0.95 * min(500, n_data) <= card["drift_reference"]["prompts"] <= 500  # unique prompts

    def status() -> dict:  # an inference endpoint: the API key, not the admin key
        r = httpx.get(f"{gateway.url}/v1/monitor/adapters/banking", headers={"authorization": f"Bearer {API_KEY}"},
                      timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())

    wait_for(lambda: str(status().get("reference_source", "")).startswith("tuning data"), timeout=30)
    assert status()["state"] in ("monitoring", "alarm") and status()["requests_seen"] >= 1, status()


def gateway_base(client) -> str:
    return next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)


def test_asha_screen_stops_poor_configurations(tiny_dir: Path, tmp_path: Path) -> None:
    """Ray Tune ASHA over learning rate and layer count on the tiny model: the configurations that cannot learn
    (learning rate 1e-7) are stopped at the first rung, and the winner and the reasons are recorded."""
    from tsugiki.config import ModelConfig
    from tsugiki.tuning.config import TuneConfig
    from tsugiki.tuning.data import Example, TuningData
    from tsugiki.tuning.screen import screen

    words = ["book a flight", "set an alarm", "what is my balance", "capital of france", "hello world"]
    ex = [Example(label_prompt(w + s), " " + w.split()[-1], w + s, w.split()[-1])
          for w in words for s in ("", " today", " now", " please", " thanks", " again")]
    data = TuningData(train=ex[::2] + ex[1::4], val=ex[3::4], data_hash="t", labels=[])
    cfg = TuneConfig(model=ModelConfig(base_model=str(tiny_dir)), num_cpus=1, batch_size=4, eval_batch_size=8)
    space = {"learning_rate": [1e-2, 1e-7], "num_layers": [1, 2]}  # grid order: the good ones run first
    res = screen(cfg, data, space=space, epochs=4, storage=tmp_path, max_concurrent=1)
    assert len(res.trials) == 4 and not any(t["error"] for t in res.trials)
    assert res.best["learning_rate"] == 1e-2
    stopped = [t for t in res.trials if t["stopped_early"]]
    assert stopped and all(t["config"]["learning_rate"] == 1e-7 for t in stopped)
    assert "ASHA stopped" in res.why and str(res.best) in res.why
    assert res.apply(cfg).learning_rate == 1e-2
