"""The control plane in-process on the tiny model: aliases over HTTP, sticky routing, shadow, canary steps,
promotion, automatic rollback, feedback, capture, refresh requests and restart.

The refresh's tuning job is replaced by a stub runner (named as such) that hands back a prepared adapter: real
tuning of the default model runs in tests/integration/test_loop.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tests.helpers import metric_value
from tsugiki.adapters.registry import VersionState
from tsugiki.config import load_settings
from tsugiki.serve.api import LocalClient, build_app
from tsugiki.serve.control import ControlPlane
from tsugiki.serve.server import ModelServer
from tsugiki.tuning.data import label_prompt

# Margins wide enough for the few requests a unit test sends (non-inferiority needs n ~ 1/margin^2).
PLAN = {"shadow_share": 0.5, "steps": [0.5, 1.0], "min_requests": 12, "min_stage_seconds": 0.0,
        "max_latency_ratio": 50.0, "max_error_rate_increase": 0.3, "max_noise_rate_increase": 0.5,
        "max_confidence_drop": 5.0}


class Env:
    def __init__(self, client: TestClient, server: ModelServer, plane: ControlPlane, root: Path) -> None:
        self.client, self.server, self.plane, self.root = client, server, plane, root
        self.n = 0

    def ask(self, model: str = "support", user: str | None = None, text: str | None = None) -> Any:
        self.n += 1
        body = {"model": model, "prompt": label_prompt(text or f"request number {self.n}"), "max_tokens": 3,
                "temperature": 0}
        if user is not None:
            body["user"] = user
        return self.client.post("/v1/completions", json=body)

    def step(self) -> list[dict[str, Any]]:
        self.client.portal.call(self.server.drain)  # type: ignore[union-attr]
        return self.client.portal.call(self.plane.step)  # type: ignore[union-attr]

    def version(self, key: str) -> VersionState:
        name, v = key.split("@v")
        return self.plane.registry.get(name, int(v)).state


def corrupt(src: Path, dest: Path, how: str) -> Path:
    """A copy of an adapter whose weights were damaged after any gate could see them."""
    shutil.copytree(src, dest)
    f = dest / "adapter_model.safetensors"
    tensors = load_file(f)
    fill = float("nan") if how == "nan" else None
    tensors = {k: (torch.full_like(t, fill) if fill is not None else t * 1000) for k, t in tensors.items()}
    save_file(tensors, f)
    return dest


@pytest.fixture
def env(tiny_dir: Path, lora_all: Path, tmp_path: Path) -> Iterator[Env]:
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(lora_all, root / "v1")
    # the second record holds a raw U+2028 (valid inside a JSON string; str.splitlines() would split there)
    (root / "data.jsonl").write_text(json.dumps({"text": "hello there", "label": "greeting"}) + "\n"
                                     + json.dumps({"text": "hi\u2028again", "label": "greeting"}, ensure_ascii=False)
                                     + "\n", encoding="utf-8")
    settings = load_settings(
        model={"base_model": str(tiny_dir), "served_name": "tiny"},
        adapters={"store_dir": str(tmp_path / "store"), "roots": [str(root)]},
        monitor={"state_dir": str(tmp_path / "monitor")},
        registry={"path": str(tmp_path / "registry.db"), "artifacts": str(tmp_path / "artifacts"), "refresh_s": 0.001},
        controller={"enabled": False, "rollout": PLAN,
                    "refresh": {"min_labelled": 5, "cooldown_s": 0, "work_dir": str(tmp_path / "refresh")}})
    calls: list[dict[str, Any]] = []

    def stub_tune_runner(cfg: Any, data_path: str, name: str, **kw: Any) -> dict[str, Any]:
        """Stub for the tuning job: records its input and returns a prepared adapter as a passing candidate."""
        calls.append({"data": Path(data_path).read_text(), "name": name, **kw})
        out = Path(kw["work_dir"]) / "candidate"
        if not out.exists():
            shutil.copytree(root / "v2", out)
        return {"status": "passed", "path": str(out), "gate": {"passed": True, "failures": []},
                "card": {"data": {"data_hash": "stub"}}, "train": {}, "run_id": "stub"}

    plane = ControlPlane(settings, tune_runner=stub_tune_runner)
    server = ModelServer(settings, control=plane)
    with TestClient(build_app(LocalClient(server, None, plane), settings.server)) as client:
        e = Env(client, server, plane, root)
        e.tune_calls = calls  # type: ignore[attr-defined]
        yield e
    server.shutdown()
    plane.registry.close()


def _first_version(env: Env) -> None:
    r = env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "v1"),
                                                       "data_path": str(env.root / "data.jsonl")})
    assert r.status_code == 201, r.text
    assert r.json()["key"] == "support@v1" and r.json()["state"] == "candidate"
    r = env.client.post("/v1/rollouts/support", json={"candidate": "support@v1"})
    assert r.status_code == 201 and r.json()["state"] == "stable", r.text


def _labelled(env: Env, text: str, label: str, n: int = 6) -> None:
    """``n`` captured requests of the alias with their labels (capture must be on)."""
    for i in range(n):
        r = env.ask(text=f"{text} {i}")
        env.client.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "label": label})


def _refresh(env: Env) -> Any:
    """An operator's refresh of ``support``, run to its end; its record."""
    assert env.client.post("/v1/refresh/support", json={"force": True}).json()["accepted"] is True
    env.step()
    env.client.portal.call(env.plane.wait_refreshes)  # type: ignore[union-attr]
    return env.plane.registry.refreshes("support")[-1]


def test_alias_shadow_canary_promote_with_sticky_callers(env: Env, lora_other: Path) -> None:
    _first_version(env)
    r = env.ask()
    assert r.status_code == 200 and r.headers["x-tsugiki-version"] == "support@v1"
    models = {m["id"]: m for m in env.client.get("/v1/models").json()["data"]}
    assert models["support"]["routes"] == {"support@v1": 1.0}

    shutil.copytree(lora_other, env.root / "v2")
    assert env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "v2")}
                           ).json()["key"] == "support@v2"
    r = env.client.post("/v1/rollouts/support", json={"candidate": "support@v2"})
    assert r.json()["stage"] == 0 and env.version("support@v2") == VersionState.shadow
    # shadow: answers still come from v1 only, while half the requests are copied to v2
    # (60 requests: a binomial(60, 0.5) shadow sample below the 12 the plan needs has probability ~1e-6)
    served = {env.ask().headers["x-tsugiki-version"] for _ in range(60)}
    assert served == {"support@v1"}
    d = env.step()[0]
    assert d["action"] == "advance", d["reason"]
    shadow_rows = env.plane.registry.outcomes("support@v2", shadow=True)
    assert 12 <= len(shadow_rows) <= 60 and all(r["agree"] is not None for r in shadow_rows)

    # canary 50%: sticky per caller, and both versions answer
    got = {u: env.ask(user=u).headers["x-tsugiki-version"] for u in (f"user-{i}" for i in range(40))}
    assert set(got.values()) == {"support@v1", "support@v2"}
    assert all(env.ask(user=u).headers["x-tsugiki-version"] == v for u, v in list(got.items())[:10])
    assert env.version("support@v2") == VersionState.canary
    assert env.step()[0]["action"] == "advance"

    # 100%: every caller on v2; compared with what v1 did during the 50% step
    assert {env.ask(user=f"user-{i}").headers["x-tsugiki-version"] for i in range(20)} == {"support@v2"}
    decision = env.step()[0]
    assert decision["action"] == "promote", decision
    assert env.version("support@v2") == VersionState.stable and env.version("support@v1") == VersionState.retired
    assert env.plane.registry.get_alias("support").routes == {"support@v2": 1.0}
    kinds = [e["kind"] for e in env.client.get("/v1/registry/events?alias=support&limit=1000").json()["data"]]
    assert kinds.count("rollout_decision") >= 3
    # the retired version's drift alarm is acknowledged (it serves nobody any more); the new one's stays
    reset: list[str] = []

    async def alarms() -> dict[str, bool]:
        return {"support@v1": "support@v1" not in reset, "support@v2": True}

    async def reset_one(label: str) -> None:
        reset.append(label)

    env.plane.monitor_alarms, env.plane.monitor_reset = alarms, reset_one
    env.step()
    assert reset == ["support@v1"]
    metrics = env.client.get("/metrics").text
    assert metric_value(metrics, "tsugiki_rollouts_finished_total", alias="support", outcome="promoted") == 1
    assert metric_value(metrics, "tsugiki_rollout_weight", alias="support", version="support@v2") == 1


def test_the_shadow_copy_is_read_through_the_shadow_versions_lexicon(env: Env, lora_other: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A refreshed version ships its own lexicon; in shadow it must be measured as it would be served: the request
    as sent, corrected by its lexicon (not by the served version's, nor not at all)."""
    from tsugiki.adapters.lexicon import Lexicon

    _first_version(env)  # v1: no lexicon
    shutil.copytree(lora_other, env.root / "v2")
    Lexicon.build(["what is my account balance", "freeze my card"]).save(env.root / "v2")
    assert env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "v2")}
                           ).json()["key"] == "support@v2"
    assert env.client.post("/v1/rollouts/support", json={"candidate": "support@v2"}).json()["stage"] == 0
    seen: dict[str, tuple[int, ...]] = {}
    generate = env.server.engine.generate

    def spy(req: Any) -> Any:
        seen[req.request_id] = req.prompt_ids
        return generate(req)

    monkeypatch.setattr(env.server.engine, "generate", spy)
    typo = "what is my acount balnce"
    for _ in range(20):  # each is shadowed with probability 1/2
        r = env.ask(text=typo)
        assert r.status_code == 200 and "x-tsugiki-corrected-words" not in r.headers  # v1 served it as sent
    env.client.portal.call(env.server.drain)  # type: ignore[union-attr]
    shadows = {k: v for k, v in seen.items() if k.endswith("-shadow")}
    assert 0 < len(shadows) < 20 and len(seen) == 20 + len(shadows)  # one served run per request, copies aside
    served = tuple(env.server._prompt_ids({"prompt": label_prompt(typo)}))
    fixed = tuple(env.server._prompt_ids({"prompt": label_prompt("what is my account balance")}))
    assert served != fixed
    assert all(seen[k.removesuffix("-shadow")] == served for k in shadows)
    assert set(shadows.values()) == {fixed}


def test_registration_refuses_unreadable_or_gate_failed_adapters(env: Env, lora_other: Path) -> None:
    corrupt(lora_other, env.root / "nan", "nan")
    r = env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "nan")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_adapter", r.text
    shutil.copytree(lora_other, env.root / "rejected")
    (env.root / "rejected" / "model_card.json").write_text(json.dumps(
        {"gate": {"passed": False, "failures": ["clean accuracy 0.2 < 0.5"]}}))
    r = env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "rejected")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "gate_failed", r.text
    assert "clean accuracy 0.2 < 0.5" in r.json()["error"]["message"]
    # the replicas' file size limit applies (adapters.max_file_bytes), not a built-in one
    s = env.plane.settings
    env.plane.settings = s.model_copy(update={"adapters": s.adapters.model_copy(update={"max_file_bytes": 100})})
    shutil.copytree(lora_other, env.root / "fine")
    r = env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "fine")})
    assert r.status_code == 400 and "adapters.max_file_bytes" in r.json()["error"]["message"], r.text
    env.plane.settings = s
    assert env.plane.registry.versions("support") == []


def test_broken_candidate_is_rolled_back_automatically(env: Env, foreign_lora: Path) -> None:
    _first_version(env)
    shutil.copytree(foreign_lora, env.root / "bad")  # reads as LoRA, but does not fit the served base model
    assert env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "bad")}
                           ).status_code == 201
    plan = env.plane.rollouts.plan
    env.plane.rollouts.plan = plan.model_copy(update={"shadow_share": 0.0})
    r = env.client.post("/v1/rollouts/support", json={"candidate": "support@v2"})
    assert r.json()["stage"] == 1, r.text
    codes = [env.ask(user=f"u{i}").status_code for i in range(40)]
    assert 0 < codes.count(200) < 40  # the canary's half fails: its weights do not load
    d = env.step()[0]
    assert d["action"] == "rollback" and "error" in d["reason"], d
    assert env.version("support@v2") == VersionState.rolled_back
    assert env.plane.registry.get_alias("support").routes == {"support@v1": 1.0}
    assert all(env.ask(user=f"u{i}").status_code == 200 for i in range(10))


def test_feedback_capture_alertmanager_refresh_and_restart(env: Env, lora_other: Path) -> None:
    _first_version(env)
    shutil.copytree(lora_other, env.root / "v2")
    # refresh with no labelled traffic: skipped, with the reason
    r = env.client.post("/v1/alerts/alertmanager", json={"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "TsugikiDriftDetected", "adapter": "support@v1"}}]})
    assert r.status_code == 200 and r.json()["results"][0]["accepted"] is True, r.text
    env.step()
    env.client.portal.call(env.plane.wait_refreshes)  # type: ignore[union-attr]
    ref = env.plane.registry.refreshes("support")[-1]
    assert ref.state == "skipped" and "0 labelled captures" in ref.detail["why"]
    assert ref.detail["counts"] == {"original": 2, "labelled_captures": 0, "min_labelled": 5}  # as a run's are

    bad = env.client.post("/v1/alerts/alertmanager", content=b"not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    bad = env.client.post("/v1/alerts/alertmanager", json={"alerts": "x"})
    assert bad.status_code == 400 and "'alerts' list" in bad.json()["error"]["message"]
    assert env.client.post("/v1/rollouts/support/explode").status_code == 404
    assert env.client.put("/v1/aliases/support/capture", json={"rate": 1.0, "retention": 100}).status_code == 200
    for i in range(8):
        r = env.ask(text=f"where is my parcel {i}")
        fb = env.client.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "label": "track_parcel"})
        assert fb.status_code == 201, fb.text
    assert env.client.post("/v1/feedback", json={"request_id": "x"}).status_code == 400
    env.client.portal.call(env.server.drain)  # type: ignore[union-attr]
    r = env.client.post("/v1/refresh/support", json={"reason": "test"})
    assert r.status_code == 202, r.text
    assert env.client.post("/v1/refresh/support", json={}).json()["accepted"] is False  # one at a time
    # an alias that does not exist is a 404 and leaves no metric series behind (labels stay bounded)
    assert env.client.post("/v1/refresh/no-such-alias", json={}).status_code == 404
    assert 'alias="no-such-alias"' not in env.client.get("/metrics").text
    env.step()
    env.client.portal.call(env.plane.wait_refreshes)  # type: ignore[union-attr]
    ref = env.plane.registry.refreshes("support")[-1]
    assert ref.state == "done" and ref.candidate == "support@v2", ref
    data = env.tune_calls[-1]["data"]  # type: ignore[attr-defined]
    assert '"label": "greeting"' in data and data.count('"label": "track_parcel"') == 8
    assert "hi\u2028again" in data
    # resumed after a controller restart, a refresh trains on the data it started with, even if its captures
    # have since aged out (it is not re-counted against min_labelled and skipped)
    refresher = env.plane.refresher
    refresher.config = refresher.config.model_copy(update={"min_labelled": 10**6})
    assert refresher.assemble(ref)["data_path"] == ref.detail["data_path"]
    assert env.tune_calls[-1]["to_store"] is False  # type: ignore[attr-defined]
    assert env.tune_calls[-1]["timeout_s"] == refresher.config.timeout_s == 6 * 3600  # type: ignore[attr-defined]

    # the controller "restarts": a new control plane over the same registry file continues
    env.step()  # starts the candidate's rollout
    ro = env.plane.registry.get_rollout("support")
    assert ro is not None and ro.candidate == "support@v2" and ro.stage == 0
    # drift during a rollout does not start another retraining
    r = env.client.post("/v1/alerts/alertmanager", json={"alerts": [
        {"status": "firing", "labels": {"alertname": "TsugikiDriftDetected", "alias": "support"}}]})
    assert r.json()["results"][0]["accepted"] is False and "refresh after it ends" in r.json()["results"][0]["why"]
    # a new control plane (its own connection to the registry file, nothing in memory) continues that rollout
    fresh = ControlPlane(env.plane.settings)
    try:
        assert fresh.registry is not env.plane.registry
        decided = fresh.rollouts.tick()
        assert [(d["rollout"], d["stage"], d["action"]) for d in decided] == [(ro.id, 0, "wait")], decided
        assert fresh.registry.get_alias("support").shadow == "support@v2"
        assert fresh.registry.feedback_count(alias="support") == 8
        assert [f.request_id for f in fresh.registry.feedback(alias="support", limit=2, newest=True)] == [
            f.request_id for f in fresh.registry.feedback(alias="support")][-2:]
    finally:
        fresh.registry.close()


def test_a_refresh_keeps_its_training_data_and_is_not_rolled_out_over_a_stable_it_was_not_gated_against(
        env: Env, lora_other: Path, lora_qv: Path) -> None:
    _first_version(env)
    shutil.copytree(lora_other, env.root / "v2")
    shutil.copytree(lora_qv, env.root / "v3")
    env.client.put("/v1/aliases/support/capture", json={"rate": 1.0, "retention": 100})
    _labelled(env, "where is my parcel", "track_parcel")
    # support@v1's training data is gone: training on the captures alone would forget its intents unseen by the
    # gate (its validation data would be captures too), so the refresh fails and says what to do
    data = env.root / "data.jsonl"
    data.rename(env.root / "elsewhere.jsonl")
    ref = _refresh(env)
    assert ref.state == "failed" and "support@v1's training data" in ref.detail["error"] and "shared volume" in \
        ref.detail["error"], ref
    assert env.tune_calls == []  # type: ignore[attr-defined]
    (env.root / "elsewhere.jsonl").rename(data)
    ref = _refresh(env)
    assert ref.state == "done" and ref.candidate == "support@v2" and ref.detail["stable"] == "support@v1", ref
    # meanwhile an operator rolls out and promotes another version: the refresh's candidate was gated against
    # support@v1, never against support@v3, so it is not rolled out over it
    assert env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "v3")}).json()[
        "key"] == "support@v3"
    assert env.client.post("/v1/rollouts/support", json={"candidate": "support@v3"}).status_code == 201
    env.plane.rollouts.promote("support")
    assert env.plane.registry.get_alias("support").routes == {"support@v3": 1.0}
    env.step()
    env.step()
    assert env.plane.registry.get_rollout("support") is None and env.version("support@v2") == VersionState.candidate


def test_a_refresh_candidate_waits_out_a_manual_split_and_outlives_its_alias(env: Env, lora_other: Path,
                                                                             lora_qv: Path) -> None:
    _first_version(env)
    shutil.copytree(lora_other, env.root / "v2")
    shutil.copytree(lora_qv, env.root / "v3")
    env.client.put("/v1/aliases/support/capture", json={"rate": 1.0, "retention": 100})
    _labelled(env, "where is my parcel", "track_parcel")
    env.client.post("/v1/registry/versions", json={"name": "other", "path": str(env.root / "v3")})
    reg = env.plane.registry
    assert _refresh(env).candidate == "support@v2"
    # an operator's split without a rollout when the refresh ends: the candidate waits, and goes once it is over
    reg.set_alias("support", {"support@v1": 0.9, "other@v1": 0.1})
    env.step()
    assert reg.get_rollout("support") is None
    reg.set_alias("support", {"support@v1": 1.0})
    env.step()
    ro = reg.get_rollout("support")
    assert ro is not None and ro.candidate == "support@v2"
    # an alias deleted while its refresh trained: the control loop goes on (the candidate stays a candidate)
    env.plane.rollouts.rollback("support", reason="test")
    _labelled(env, "book a table", "book")
    shutil.rmtree(Path(env.tune_calls[-1]["work_dir"]) / "candidate")  # type: ignore[attr-defined]
    shutil.copytree(lora_qv, env.root / "v2", dirs_exist_ok=True)
    assert _refresh(env).candidate == "support@v3"
    reg.delete_alias("support")
    env.step()
    env.step()
    assert env.version("support@v3") == VersionState.candidate


def test_a_refresh_trains_on_every_labelled_capture_its_stable_version_did_not(env: Env, lora_other: Path,
                                                                                lora_qv: Path) -> None:
    _first_version(env)
    shutil.copytree(lora_other, env.root / "v2")
    env.client.put("/v1/aliases/support/capture", json={"rate": 1.0, "retention": 100})

    _labelled(env, "where is my parcel", "track_parcel")
    # captured now, labelled only after the next version is made
    late = str(env.ask(text="my card was declined").headers["x-request-id"])

    def refresh() -> str:
        ref = _refresh(env)
        assert ref.state == "done", ref
        return str(env.tune_calls[-1]["data"])  # type: ignore[attr-defined]

    assert refresh().count('"track_parcel"') == 6
    env.step()  # the candidate's rollout starts
    env.plane.rollouts.promote("support")
    assert env.version("support@v2") == VersionState.stable
    assert env.plane.registry.get("support", 2).created > [
        c.ts for c in env.plane.registry.captures("support") if c.request_id == late][0]
    env.client.post("/v1/feedback", json={"request_id": late, "label": "card_declined"})
    _labelled(env, "set an alarm for", "alarm", 5)
    shutil.rmtree(Path(env.tune_calls[-1]["work_dir"]) / "candidate")  # type: ignore[attr-defined]
    shutil.copytree(lora_qv, env.root / "v2", dirs_exist_ok=True)  # the stub's next candidate: other content
    data = refresh()
    # the late label is there; the captures support@v2 trained on come once, from its data file
    assert data.count('"card_declined"') == 1 and data.count('"alarm"') == 5 and data.count('"track_parcel"') == 6


def test_failures_end_as_outcomes_not_stuck_state(env: Env, lora_other: Path) -> None:
    _first_version(env)
    # a routed version whose files vanished from the artifact store: a 500 for the caller, evidence for the controller
    shutil.copytree(lora_other, env.root / "v2")
    env.client.post("/v1/registry/versions", json={"name": "support", "path": str(env.root / "v2")})
    env.plane.rollouts.plan = env.plane.rollouts.plan.model_copy(update={"shadow_share": 0.0})
    env.client.post("/v1/rollouts/support", json={"candidate": "support@v2"})
    rec = env.plane.registry.get("support", 2)
    shutil.rmtree(rec.artifact_uri.removeprefix("file://"))
    codes = {}
    for i in range(20):
        r = env.ask(user=f"u{i}")
        codes[r.status_code] = r
    assert 500 in codes and codes[500].json()["error"]["code"] == "routed_version_failed", codes
    env.client.portal.call(env.server.drain)  # type: ignore[union-attr]
    assert [o["ok"] for o in env.plane.registry.outcomes("support@v2")] == [False] * len(
        env.plane.registry.outcomes("support@v2")) and env.plane.registry.outcomes("support@v2")

    # a decision recorded but not carried out (the controller died in between) is completed by the next tick
    ro = env.plane.registry.get_rollout("support")
    assert ro is not None
    env.plane.registry.update_rollout(ro.id, evidence={**ro.evidence, "finishing": "rollback",
                                                       "finishing_reason": "test"})
    env.plane.rollouts.promote("support")  # an operator's later promote does not override the recorded rollback
    assert env.version("support@v2") == VersionState.rolled_back
    assert env.plane.registry.get_alias("support").routes == {"support@v1": 1.0}

    # a refresh whose job hands back something unusable ends failed, and the next one can run
    env.tune_calls.clear()  # type: ignore[attr-defined]
    env.plane.refresher.tune_runner = lambda *a, **kw: {"status": "passed", "path": "/nonexistent", "gate": {}}
    env.client.put("/v1/aliases/support/capture", json={"rate": 1.0, "retention": 100})
    for i in range(6):
        r = env.ask(text=f"open the garage {i}")
        env.client.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "label": "garage"})
    r = env.ask(text="a label the data format refuses")
    env.client.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "label": "two\nlines"})
    env.client.portal.call(env.server.drain)  # type: ignore[union-attr]
    assert env.client.post("/v1/refresh/support", json={"force": True}).json()["accepted"] is True
    env.step()
    env.client.portal.call(env.plane.wait_refreshes)  # type: ignore[union-attr]
    ref = env.plane.registry.refreshes("support")[-1]
    assert ref.state == "failed" and "nonexistent" in ref.detail["error"], ref
    data = (Path(ref.detail["data_path"])).read_text()
    assert data.count('"label": "garage"') == 6 and "two" not in data
    assert env.client.post("/v1/refresh/support", json={"force": True}).json()["accepted"] is True


def test_a_tuning_job_past_its_time_limit_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refreshes run one at a time: a task that hangs, or that no node can schedule, must not hold them all. The
    Ray calls are replaced (no cluster in unit tests); the refresh then ends failed with this error."""
    import ray
    from ray.exceptions import GetTimeoutError

    import tsugiki.tuning.job as job
    from tsugiki.tuning.config import TuneConfig
    from tsugiki.tuning.refresh import _ray_runner

    calls: dict[str, Any] = {}

    def get(task: object, timeout: float | None = None) -> None:
        calls["get"] = (task, timeout)
        raise GetTimeoutError("still running")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(job, "submit", lambda *a, **kw: "the task")
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "cancel", lambda task, force=False: calls.update(cancel=(task, force)))
    with pytest.raises(TimeoutError, match=r"ran past refresh.timeout_s \(60 s\) and was cancelled.*num_gpus 0"):
        _ray_runner(TuneConfig(), "train.jsonl", "support", timeout_s=60, to_store=False)
    assert calls == {"get": ("the task", 60), "cancel": ("the task", True)}


def test_outcomes_kept_for_a_retry_fill_the_buffer_newest_first() -> None:
    import asyncio

    from tsugiki.serve.outcomes import OutcomeRecorder

    arriving: list[dict[str, Any]] = []

    async def sink(rows: list[dict[str, Any]], caps: list[Any]) -> None:
        for r in arriving:  # rows that replicas add while the write is in flight
            rec.add(r)
        arriving.clear()
        raise ConnectionError("controller restarting")

    async def run() -> None:
        for i in range(3):
            rec.add({"request_id": f"a{i}"})
        await rec.flush()  # fails: all 3 fit the empty buffer of 5, none is dropped
        assert [r["request_id"] for r in rec._rows] == ["a0", "a1", "a2"] and rec.dropped == 0
        arriving.extend({"request_id": f"b{i}"} for i in range(4))
        await rec.flush()  # fails again while 4 new rows arrive: only the newest failed one still fits
        assert [r["request_id"] for r in rec._rows] == ["a2", "b0", "b1", "b2", "b3"] and rec.dropped == 2

    rec = OutcomeRecorder(sink, max_buffer=5)
    asyncio.run(run())


def test_control_loop_stops_at_once_and_quietly_when_the_process_exits(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    async def stuck() -> list[dict[str, Any]]:  # a step waiting on a monitor that is shutting down too
        await asyncio.sleep(3600)
        return []

    async def stop_mid_step() -> float:
        env.plane.step = stuck  # type: ignore[method-assign]
        env.plane.start()
        await asyncio.sleep(0.05)
        task = env.plane._loop_task
        t0 = asyncio.get_running_loop().time()
        await env.plane.stop()
        assert task is not None and task.done() and env.plane._loop_task is None
        return asyncio.get_running_loop().time() - t0

    assert env.client.portal.call(stop_mid_step) < 5  # type: ignore[union-attr]  # not the step's hour

    async def exiting() -> list[dict[str, Any]]:  # what asyncio.to_thread raises once the interpreter exits
        raise RuntimeError("cannot schedule new futures after shutdown")

    async def run_until_exit() -> None:
        env.plane.step = exiting  # type: ignore[method-assign]
        env.plane.start()  # a stopped loop starts again
        task = env.plane._loop_task
        assert task is not None
        await asyncio.wait_for(task, 5)  # returns instead of retrying every tick

    with caplog.at_level("INFO", logger="tsugiki.serve.control"):
        env.client.portal.call(run_until_exit)  # type: ignore[union-attr]
    assert [r.levelname for r in caplog.records] == ["INFO"], caplog.text


def test_drain_hands_over_buffered_monitor_observations(tiny_dir: Path, tmp_path: Path) -> None:
    """What a replica does when it shuts down: nothing it accepted stays in its buffers."""
    shipped: list[dict[str, Any]] = []

    async def sink(batch: list[dict[str, Any]]) -> None:
        shipped.extend(batch)

    settings = load_settings(model={"base_model": str(tiny_dir), "served_name": "tiny"},
                             adapters={"store_dir": str(tmp_path / "store")})
    server = ModelServer(settings, monitor_sink=sink)
    server.shipper.interval_s = 3600.0  # no background flush during the test
    try:
        with TestClient(build_app(LocalClient(server, None), settings.server)) as client:
            for i in range(3):
                r = client.post("/v1/completions", json={"model": "tiny", "prompt": f"hello {i}", "max_tokens": 1})
                assert r.status_code == 200, r.text
            assert shipped == []
            client.portal.call(server.drain)  # type: ignore[union-attr]
            assert len(shipped) == 3
    finally:
        server.shutdown()
