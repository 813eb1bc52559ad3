"""Drift references built from an adapter's tuning data (monitoring/reference.py): the tuning job ships the
monitor's features of its training prompts, computed exactly as the serving engine computes them, and loading
or registering the adapter hands them to the monitor, which then watches from the first request."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tsugiki.adapters.format import REFERENCE_FILE
from tsugiki.config import ModelConfig, load_settings
from tsugiki.monitoring.drift import DriftConfig
from tsugiki.monitoring.monitor import Monitor, MonitorConfig
from tsugiki.monitoring.noise import REASONS, NoiseDetector
from tsugiki.monitoring.reference import FEATURES, read_reference, write_reference
from tsugiki.serve.api import LocalClient, build_app
from tsugiki.serve.base_model import load_base_model
from tsugiki.serve.control import ControlPlane
from tsugiki.serve.server import ModelServer
from tsugiki.tuning.config import GateConfig, RobustConfig, TuneConfig
from tsugiki.tuning.data import label_prompt, text_of_label_prompt
from tsugiki.tuning.job import run_local

TEXTS = ["book a flight to tokyo", "set an alarm for 7 am", "what is my balance", "the capital of france",
         "hello world how are you", "the quick brown fox", "jumps over the lazy dog", "paris is the capital"]
LABELS = ["travel", "alarm", "balance", "capital"]


class Sink:
    """Records what reaches the monitor (the Ray deployment's ``set_reference`` in production)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, np.ndarray, str, str, np.ndarray | None]] = []

    async def __call__(self, label: str, features: np.ndarray, source: str, key: str,
                       noise: np.ndarray | None = None) -> dict[str, Any]:
        self.calls.append((label, np.asarray(features), source, key, noise))
        return {}


def _tuned(tiny_dir: Path, tmp_path: Path, n: int = 64) -> tuple[Path, list[str]]:
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(n)]
    texts[5] = "bokk a flihgt to tokoy pls"  # one with typos: its noise score shows in the shipped reference
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": LABELS[i % len(LABELS)]}) + "\n"
                            for i, t in enumerate(texts)))
    cfg = TuneConfig(model=ModelConfig(base_model=str(tiny_dir)), num_layers=1, rank=4, alpha=8, epochs=1,
                     batch_size=8, num_cpus=1, drift_reference=100,
                     robust=RobustConfig(families=("typos",), strengths=(0.5,)),  # the strength shows
                     gate=GateConfig(families=("typos",), max_family_drop=1.0, min_retained_agreement=0.0,
                                     min_gain_over_base=-1.0))
    res = run_local(cfg, data, "intent", store_dir=tmp_path / "store", work_dir=tmp_path / "work", progress=False)
    assert res.status == "written", res.gate
    assert res.card["drift_reference"]["prompts"] == n  # every prompt: fewer than drift_reference
    return Path(res.path), [label_prompt(t) for t in texts]


def texts_of(prompts: list[str]) -> list[str]:
    return [t for t in map(text_of_label_prompt, prompts) if t is not None]


def test_the_job_ships_the_features_the_engine_computes_and_loading_sets_the_reference(
        tiny_dir: Path, tmp_path: Path) -> None:
    adapter, prompts = _tuned(tiny_dir, tmp_path)
    fp = load_base_model(ModelConfig(base_model=str(tiny_dir)), progress=False).info.fingerprint
    found = read_reference(adapter, base_fingerprint=fp)
    assert found is not None
    shipped, source, signals = found
    assert shipped.shape[0] == len(prompts) and source.startswith("tuning data (64 prompts")
    # the noise channel's reference: the raw noise signals of each prompt's user text, scored by the replica
    detector = NoiseDetector()
    expected = {label_prompt(t): detector.score(t).score for t in texts_of(prompts)}
    assert signals is not None and set(signals) == set(REASONS)
    scores = found.noise_scores(detector)
    assert scores is not None and max(expected.values()) > 1  # the typo-ridden one (stored as float32)
    assert np.allclose(sorted(scores), sorted(expected.values()), atol=1e-6)

    observed: list[dict[str, Any]] = []

    async def observe(batch: list[dict[str, Any]]) -> None:
        observed.extend(batch)

    sink = Sink()
    settings = load_settings(model={"base_model": str(tiny_dir), "served_name": "tiny"},
                             adapters={"store_dir": str(tmp_path / "serve-store"), "roots": [str(tmp_path)]})
    server = ModelServer(settings, monitor_sink=observe, monitor_reference=sink)
    try:
        with TestClient(build_app(LocalClient(server, None), settings.server)) as client:
            r = client.post("/v1/adapters", json={"name": "intent", "path": str(adapter)})
            assert r.status_code in (200, 201), r.text
            assert r.json()["drift_reference"] == source
            assert [c[0] for c in sink.calls] == ["intent"] and np.array_equal(sink.calls[0][1], shipped)
            assert np.array_equal(sink.calls[0][4], scores)  # with the prompts' noise scores
            assert sink.calls[0][3].startswith("intent@v1:")
            for p in prompts[:6]:
                assert client.post("/v1/completions", json={"model": "intent", "prompt": p,
                                                            "max_tokens": 1}).status_code == 200
            client.portal.call(server.drain)  # type: ignore[union-attr]
            assert len(sink.calls) == 1  # this replica handed it over when loading; requests do not repeat it

            # a version written to the store by someone else (`tsugiki tune --store-dir`): handed over on first use
            other = server.store.put("intent-copy", adapter)
            assert client.post("/v1/completions", json={"model": "intent-copy", "prompt": prompts[0],
                                                        "max_tokens": 1}).status_code == 200
            client.portal.call(server.drain)  # type: ignore[union-attr]
            assert [c[0] for c in sink.calls] == ["intent", "intent-copy"]
            assert sink.calls[1][3].startswith(f"{other.key}:")
    finally:
        server.shutdown()
    # each served request's features (the engine, the adapter at its chosen strength) is one shipped row, and
    # the noise score the replica ships for it is the one the reference holds for that prompt (the replica
    # knows the prompt's token count, the reference does not: the drift channel's score leaves it out)
    served = [o for o in observed if o["adapter"] == "intent"]
    assert len(served) == 6
    for obs in served:
        live = np.asarray(obs["features"], dtype=np.float32)
        gap = np.abs(shipped - live[None, :]).max(1)
        assert gap.min() < 1e-4 * max(1.0, float(np.abs(live).max())), gap.min()
        assert obs["noise_score"] == pytest.approx(scores[int(gap.argmin())], abs=1e-6)


def test_a_reference_for_another_base_model_or_feature_definition_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    feats = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    write_reference(tmp_path, feats, base_fingerprint="base-a", dtype="torch.float32", source="tuning data")
    got = read_reference(tmp_path, base_fingerprint="base-a", dtype="torch.float32", dim=8)
    assert got is not None and np.array_equal(got[0], feats) and got[1] == "tuning data"
    assert got.noise_signals is None and got.noise_scores(NoiseDetector()) is None  # written without them
    with pytest.raises(ValueError, match="noise signals of shape"):
        write_reference(tmp_path / "x", feats, base_fingerprint="base-a", dtype="torch.float32", source="s",
                        noise_signals=np.zeros((3, len(REASONS))))
    with caplog.at_level(logging.WARNING, logger="tsugiki.monitoring.reference"):
        assert read_reference(tmp_path, base_fingerprint="base-b") is None
        assert read_reference(tmp_path, base_fingerprint="base-a", dim=16) is None
        assert read_reference(tmp_path, base_fingerprint="base-a", dtype="torch.bfloat16") is None  # a GPU server
        from safetensors.numpy import save_file

        save_file({"features": feats}, str(tmp_path / REFERENCE_FILE),
                  metadata={"base_model_fingerprint": "base-a", "features": "something else"})
        assert read_reference(tmp_path, base_fingerprint="base-a") is None
        (tmp_path / REFERENCE_FILE).write_bytes(b"not safetensors")
        assert read_reference(tmp_path, base_fingerprint="base-a") is None
    assert "another base model" in caplog.text and "shape" in caplog.text and FEATURES in caplog.text
    assert "computed in torch.float32, this server computes in torch.bfloat16" in caplog.text
    assert "unreadable" in caplog.text
    assert read_reference(tmp_path / "nothing-here", base_fingerprint="base-a") is None  # adapters from elsewhere


def test_a_data_reference_makes_the_monitor_watch_from_the_first_request_and_survives_a_restart(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cfg = MonitorConfig(state_dir=tmp_path / "mon", drift=DriftConfig(reference_size=500, ert=1000),
                        save_interval_s=0)
    mon = Monitor(cfg)
    status = mon.set_reference("intent", rng.normal(size=(120, 16)), "tuning data (120 prompts)")
    assert status["state"] == "monitoring" and status["reference_source"] == "tuning data (120 prompts)"
    mon.observe([{"adapter": "intent", "request_id": "r1", "time": 0.0, "features": rng.normal(size=16)}])
    assert mon.status("intent")["requests_seen"] == 1  # scored at once, not collected as reference
    # the same version handed over again (another replica, the controller): kept as it is, CUSUM included
    mon.set_reference("intent", rng.normal(size=(120, 16)), "tuning data (120 prompts)", key="intent@v1:abc")
    mon.observe([{"adapter": "intent", "request_id": "r2", "time": 0.0, "features": rng.normal(size=16)}])
    again = mon.set_reference("intent", rng.normal(size=(120, 16)), "copy", key="intent@v1:abc")
    assert again["requests_seen"] == 2 and again["reference_source"] == "tuning data (120 prompts)"
    restarted = Monitor(cfg)
    assert restarted.status("intent")["reference_source"] == "tuning data (120 prompts)"
    assert restarted.set_reference("intent", rng.normal(size=(120, 16)), "copy",
                                   key="intent@v1:abc")["reference_source"] == "tuning data (120 prompts)"
    # a new version replaces it
    assert mon.set_reference("intent", rng.normal(size=(120, 16)), "v2 data",
                             key="intent@v2:def")["reference_source"] == "v2 data"
    with pytest.raises(ValueError, match="at least"):
        mon.set_reference("tiny", rng.normal(size=(10, 16)), "too few")


def test_an_alias_version_hands_its_reference_over_on_first_use_and_retries_a_monitor_outage(
        tiny_dir: Path, lora_all: Path, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(lora_all, root / "v1")
    loaded = load_base_model(ModelConfig(base_model=str(tiny_dir)), progress=False)
    feats = np.random.default_rng(1).normal(size=(60, loaded.model.config.hidden_size)).astype(np.float32)
    write_reference(root / "v1", feats, base_fingerprint=loaded.info.fingerprint, dtype=str(loaded.model.dtype),
                    source="tuning data (60 prompts)")
    settings = load_settings(model={"base_model": str(tiny_dir), "served_name": "tiny"},
                             adapters={"store_dir": str(tmp_path / "store"), "roots": [str(root)]},
                             registry={"path": str(tmp_path / "registry.db"), "artifacts": str(tmp_path / "art"),
                                       "refresh_s": 0.001},
                             controller={"enabled": False})
    plane = ControlPlane(settings, base_fingerprint=loaded.info.fingerprint)
    down = [True]

    class Flaky(Sink):
        async def __call__(self, label: str, features: np.ndarray, source: str, key: str,
                           noise: np.ndarray | None = None) -> dict[str, Any]:
            if down[0]:
                raise ConnectionError("monitor restarting")
            return await super().__call__(label, features, source, key, noise)

    sink = Flaky()
    server = ModelServer(settings, loaded=loaded, monitor_reference=sink, control=plane)
    try:
        with TestClient(build_app(LocalClient(server, None, plane), settings.server)) as client:
            assert client.post("/v1/registry/versions", json={"name": "support", "path": str(root / "v1")}
                               ).status_code == 201
            assert client.post("/v1/rollouts/support", json={"candidate": "support@v1"}).status_code == 201

            def ask() -> None:
                r = client.post("/v1/completions", json={"model": "support", "prompt": "hello", "max_tokens": 1})
                assert r.status_code == 200, r.text  # the monitor being down never reaches a request
                client.portal.call(server.drain)  # type: ignore[union-attr]

            ask()
            assert sink.calls == []  # the monitor was down: not handed over, not forgotten
            down[0] = False
            ask()
            assert sink.calls == []  # a minute between attempts, not one per request
            server._references = {k: 0.0 for k in server._references}  # that minute passes
            ask()
            ask()
            assert [(c[0], c[2]) for c in sink.calls] == [("support@v1", "tuning data (60 prompts)")]
            assert np.array_equal(sink.calls[0][1], feats) and sink.calls[0][3].startswith("support@v1:")
    finally:
        server.shutdown()
        plane.registry.close()


def test_prompts_are_tokenised_as_the_gateway_tokenises_them() -> None:
    """A tokenizer that adds BOS: a plain prompt gets it (as /v1/completions does), a chat rendered by the
    chat template already starts with it and does not get a second one (as /v1/chat/completions does)."""
    import torch

    class Tok:
        bos_token, pad_token_id = "<s>", 0

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            ids = [2 if w == "<s>" else 10 + len(w) for w in text.split()]
            return {"input_ids": ([2] if add_special_tokens else []) + ids}

    seen: list[list[int]] = []

    class Decoder(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
            return type("Out", (), {"last_hidden_state": input_ids[:, :, None].float().repeat(1, 1, 3)})

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.decoder = Decoder()

        def get_decoder(self) -> Decoder:
            return self.decoder

    from tsugiki.monitoring.reference import prompt_features

    feats = prompt_features(Model(), Tok(), ["what is my balance", "<s> user hi"])
    assert seen == [[2, 14, 12, 12, 17], [2, 14, 12]]
    assert feats.shape == (2, 3) and feats[1, 0] == pytest.approx((2 + 14 + 12) / 3)  # padding left out
