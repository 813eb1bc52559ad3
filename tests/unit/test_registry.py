"""The adapter registry (SQLite) and artifact stores (local and a real S3-compatible server, moto)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from tsugiki.adapters.artifacts import (
    COMPLETE_MARKER,
    ArtifactStoreError,
    LocalArtifacts,
    S3Artifacts,
    artifacts_from_uri,
)
from tsugiki.adapters.format import content_digest, read_lora_artifact
from tsugiki.adapters.registry import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Alias,
    ConflictError,
    Registry,
    RolloutState,
    VersionState,
    in_shadow,
    parse_key,
    route,
)
from tsugiki.adapters.store import AdapterStore
from tsugiki.errors import AdapterError, ConfigError, InvalidRequestError, NotFoundError, TsugikiError

BASE = "tiny-llama@sha256:0123"
S = VersionState


def make_adapter(path: Path, seed: int) -> Path:
    """A tiny valid PEFT LoRA directory (rank 2 on one q_proj) whose content depends on ``seed``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none",
         "base_model_name_or_path": "tiny-llama"}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": rng.standard_normal((2, 16), dtype=np.float32),
               f"{prefix}.lora_B.weight": rng.standard_normal((16, 2), dtype=np.float32)},
              str(path / "adapter_model.safetensors"))
    return path


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "reg" / "registry.db") as r:
        yield r


@pytest.fixture
def art(tmp_path: Path) -> list[Path]:
    return [make_adapter(tmp_path / f"src{i}", seed=i) for i in range(3)]


# ---- schema ----------------------------------------------------------------------------------------------------------
def test_empty_db_is_created_at_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    sqlite3.connect(db).close()  # an existing, empty file at user_version 0
    with Registry(db) as r:
        assert r.schema_version == SCHEMA_VERSION
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"versions", "events", "aliases", "feedback", "captures", "rollouts"} <= tables


def test_older_db_is_migrated_keeping_its_rows(tmp_path: Path, art: list[Path]) -> None:
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO versions (name, version, digest, base_fingerprint, state, artifact_uri, created, "
                 "updated) VALUES ('old', 1, 'd', 'b', 'stable', 'file:///x/old/d', 1.0, 1.0)")
    conn.close()
    with Registry(db) as r:
        assert r.schema_version == SCHEMA_VERSION > 1
        assert r.get("old", 1).state is S.stable
        v2 = r.register("old", art[0], base_fingerprint=BASE)  # the new tables work too
        r.set_alias("old-alias", {"old@v1": 0.5, v2.key: 0.5})
        assert r.get_alias("old-alias").generation == 1


def test_newer_db_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this tsugiki knows "
                                          rf"\({SCHEMA_VERSION}\); upgrade tsugiki"):
        Registry(db)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # untouched


def test_memory_db_is_refused() -> None:
    with pytest.raises(ConfigError, match="not ':memory:'"):
        Registry(":memory:")


# ---- versions --------------------------------------------------------------------------------------------------------
def test_register_numbers_versions_and_is_idempotent(reg: Registry, art: list[Path], tmp_path: Path) -> None:
    v1 = reg.register("intent", art[0], base_fingerprint=BASE, data_hash="d1", tuning_config={"lr": 1e-4})
    assert (v1.key, v1.state, v1.parent_version, v1.tuning_config) == ("intent@v1", S.candidate, None, {"lr": 1e-4})
    v2 = reg.register("intent", art[1], base_fingerprint=BASE, parent_version=1, gate_report={"passed": True})
    assert (v2.version, v2.parent_version, v2.gate_report) == (2, 1, {"passed": True})
    again = reg.register("intent", art[0], base_fingerprint="other", tuning_config={"lr": 9.0})
    assert again == v1  # same content: the existing version, unchanged, and no new event
    assert reg.register("other", art[0], base_fingerprint=BASE).version == 1  # numbering is per name
    assert [v.version for v in reg.versions("intent")] == [1, 2]
    assert [v.key for v in reg.versions()] == ["intent@v1", "intent@v2", "other@v1"]
    assert reg.latest("intent") == v2 and reg.latest("intent", S.stable) is None and reg.latest("nope") is None
    assert [(e.name, e.version) for e in reg.events(kind="registered")] == [("intent", 1), ("intent", 2), ("other", 1)]
    assert v1.artifact_uri.startswith((reg.path.parent / "artifacts").as_uri())
    assert v1.artifact_uri.endswith(f"/intent/{v1.digest}")

    out = reg.fetch("intent", 2, tmp_path / "fetched")
    assert content_digest(out) == v2.digest
    assert read_lora_artifact(out).max_rank == 2

    with pytest.raises(NotFoundError, match=r"intent@v7 is not registered"):
        reg.get("intent", 7)
    with pytest.raises(NotFoundError, match=r"parent version intent@v9 is not registered"):
        reg.register("intent", art[2], base_fingerprint=BASE, parent_version=9)
    with pytest.raises(InvalidRequestError, match="adapter name '../x' is invalid"):
        reg.register("../x", art[2], base_fingerprint=BASE)
    with pytest.raises(InvalidRequestError, match="base_fingerprint must be a non-empty string"):
        reg.register("intent", art[2], base_fingerprint="")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        reg.register("intent", tmp_path / "empty", base_fingerprint=BASE)
    assert [v.version for v in reg.versions("intent")] == [1, 2]  # failed registrations left nothing behind


def test_fetch_verifies_the_digest(reg: Registry, art: list[Path], tmp_path: Path) -> None:
    v = reg.register("intent", art[0], base_fingerprint=BASE)
    stored = Path(v.artifact_uri.removeprefix("file://")) / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor value: still a readable safetensors file
    stored.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(AdapterError, match=rf"artifact {v.artifact_uri} is corrupt: its content digest is"):
        reg.fetch("intent", 1, dest)
    assert not dest.exists()  # nothing unverified is left where a loader would look
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fetch-")]


def test_local_artifacts_refuse_a_wrong_digest_and_unknown_uris(tmp_path: Path, art: list[Path]) -> None:
    store = LocalArtifacts(tmp_path / "a")
    with pytest.raises(AdapterError, match="has digest .* not the 0{64} it is being stored under"):
        store.put("x", art[0], "0" * 64)
    assert not (tmp_path / "a" / "x" / ("0" * 64)).exists()
    uri = store.put("x", art[0], content_digest(art[0]))
    assert store.put("x", art[0], content_digest(art[0])) == uri and store.exists(uri)
    missing = store.uri_for("x", "1" * 64)
    assert not store.exists(missing)
    with pytest.raises(AdapterError, match=rf"artifact {missing} does not exist"):
        store.fetch(missing, tmp_path / "d")
    with pytest.raises(AdapterError, match="does not end in <name>/<sha256 digest>"):
        store.fetch("file:///tmp/x/notadigest", tmp_path / "d")


def test_the_lexicon_is_part_of_the_content_digest(tmp_path: Path, art: list[Path]) -> None:
    """The lexicon changes what the model is handed: another lexicon is another version, a changed lexicon in an
    artifact store is refused like changed weights, and an adapter without one keeps the config+weights digest."""
    import hashlib

    a = art[0]
    h = hashlib.sha256(json.dumps(json.loads((a / "adapter_config.json").read_text()), sort_keys=True).encode())
    h.update((a / "adapter_model.safetensors").read_bytes())
    plain = content_digest(a)
    assert plain == h.hexdigest()
    (a / "model_card.json").write_text('{"data_hash": "d1"}')  # describes the version: not digested
    assert content_digest(a) == plain
    (a / "lexicon.json").write_text('{"counts": {"balance": 3}}')
    with_lexicon = content_digest(a)
    (a / "lexicon.json").write_text('{"counts": {"balance": 4}}')
    assert len({plain, with_lexicon, content_digest(a)}) == 3

    store = AdapterStore(tmp_path / "store")
    v1 = store.put("intent", a)
    (a / "lexicon.json").write_text('{"counts": {"balance": 3}}')
    v2 = store.put("intent", a)
    assert (v1.version, v2.version, v2.digest) == (1, 2, with_lexicon)
    assert store.put("intent", a).version == 2  # same weights, same lexicon: the same version

    artifacts = LocalArtifacts(tmp_path / "a")
    uri = artifacts.put("intent", a, with_lexicon)
    stored = artifacts.root / "intent" / with_lexicon
    (stored / "lexicon.json").write_text('{"counts": {"balance": 3, "balence": 1}}')
    with pytest.raises(AdapterError, match=rf"artifact {uri} is corrupt"):
        artifacts.fetch(uri, tmp_path / "got")
    (stored / "lexicon.json").unlink()  # a lost lexicon too: the adapter would be served without it
    with pytest.raises(AdapterError, match=rf"artifact {uri} is corrupt"):
        artifacts.fetch(uri, tmp_path / "got")
    # fetched into an existing directory, no companion file the artifact lacks stays behind
    plain_uri = artifacts.put("plain", art[1], content_digest(art[1]))
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "lexicon.json").write_text('{"counts": {"stale": 1}}')
    (slot / "notes.txt").write_text("not an artifact file: left alone")
    artifacts.fetch(plain_uri, slot)
    assert not (slot / "lexicon.json").exists() and (slot / "notes.txt").exists()
    assert content_digest(slot) == content_digest(art[1])


def test_artifacts_from_uri_chooses_by_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(artifacts_from_uri(str(tmp_path / "p")), LocalArtifacts)
    local = artifacts_from_uri((tmp_path / "q").as_uri())
    assert isinstance(local, LocalArtifacts) and local.root == tmp_path / "q"
    assert isinstance(artifacts_from_uri("s3://bkt/prefix", client=object()), S3Artifacts)
    with pytest.raises(ConfigError, match=r"unsupported scheme 'gs'; supported: s3://bucket/prefix, file:///abs/dir"):
        artifacts_from_uri("gs://bkt/x")
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if boto3 were not installed
    with pytest.raises(ConfigError, match=r'needs boto3: pip install "tsugiki\[s3\]"'):
        S3Artifacts("s3://bkt/prefix")


# ---- lifecycle -------------------------------------------------------------------------------------------------------
ALLOWED = {  # written out here, not imported, so a wrong table in the module fails the test
    S.candidate: {S.shadow, S.canary, S.stable, S.retired, S.rolled_back},
    S.shadow: {S.canary, S.stable, S.rolled_back, S.retired},
    S.canary: {S.stable, S.rolled_back},
    S.stable: {S.retired},
    S.retired: set(),
    S.rolled_back: set(),
}


def test_transitions_follow_the_table(reg: Registry, art: list[Path]) -> None:
    for i, (old, new) in enumerate((o, n) for o in S for n in S):
        reg.register(f"a{i}", art[0], base_fingerprint=BASE, state=old)
        if new in ALLOWED[old]:
            v = reg.transition(f"a{i}", 1, new, reason="test")
            assert v.state is new and reg.get(f"a{i}", 1).state is new
        else:
            with pytest.raises(ConflictError, match=f"a{i}@v1 cannot go from {old.value} to {new.value}"):
                reg.transition(f"a{i}", 1, new, reason="test")
            assert reg.get(f"a{i}", 1).state is old
    retired = next(v for v in reg.versions() if v.state is S.retired)
    with pytest.raises(ConflictError, match=r"from retired it can go to nothing \(it is final\)"):
        reg.transition(retired.name, 1, S.stable, reason="x")
    with pytest.raises(InvalidRequestError, match="needs a reason"):
        reg.transition("a1", 1, S.stable, reason=" ")
    with pytest.raises(NotFoundError, match="a1@v5 is not registered"):
        reg.transition("a1", 5, S.stable, reason="x")


def test_a_routed_version_cannot_be_retired(reg: Registry, art: list[Path]) -> None:
    v1 = reg.register("intent", art[0], base_fingerprint=BASE, state=S.stable)
    v2 = reg.register("intent", art[1], base_fingerprint=BASE, state=S.canary)
    reg.set_alias("support", {v1.key: 0.9, v2.key: 0.1})
    with pytest.raises(ConflictError, match="support still route to it; set_alias"):
        reg.transition("intent", 2, S.rolled_back, reason="error rate")
    reg.set_alias("support", {v1.key: 1.0})
    assert reg.transition("intent", 2, S.rolled_back, reason="error rate").state is S.rolled_back
    with pytest.raises(ConflictError, match="cannot route to intent@v2: it is rolled_back"):
        reg.set_alias("support", {v1.key: 0.5, v2.key: 0.5})


def test_transition_and_its_event_commit_together(reg: Registry, art: list[Path]) -> None:
    reg.register("intent", art[0], base_fingerprint=BASE)
    saboteur = sqlite3.connect(reg.path)
    saboteur.execute("CREATE TRIGGER boom BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'boom'); END")
    saboteur.commit()
    with pytest.raises(TsugikiError, match="boom"):
        reg.transition("intent", 1, S.canary, reason="gate passed")
    assert reg.get("intent", 1).state is S.candidate  # the failed event insert took the state change with it
    saboteur.execute("DROP TRIGGER boom")
    saboteur.commit()
    v = reg.transition("intent", 1, S.canary, reason="gate passed", actor="controller", data={"auc": 0.91})
    (ev,) = reg.events(kind="transition")
    assert (ev.name, ev.version, ev.actor) == ("intent", 1, "controller")
    assert ev.payload == {"from": "candidate", "to": "canary", "reason": "gate passed", "data": {"auc": 0.91}}
    assert v.updated >= v.created
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        saboteur.execute("UPDATE events SET kind = 'forged'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        saboteur.execute("DELETE FROM events")
    saboteur.close()


def test_event_log_filters_and_polling(reg: Registry) -> None:
    a = reg.log_event("decision", alias="support", payload={"stage": 1})
    b = reg.log_event("decision", alias="other", name="intent", version=2, actor="controller")
    c = reg.log_event("note", alias="support")
    assert a < b < c
    assert [e.id for e in reg.events(alias="support")] == [a, c]
    assert [e.id for e in reg.events(kind="decision", since_id=a)] == [b]
    assert [e.id for e in reg.events(name="intent")] == [b]
    assert [e.id for e in reg.events(limit=2)] == [a, b]
    assert reg.events(alias="support")[0].payload == {"stage": 1}
    with pytest.raises(InvalidRequestError, match="payload must be a JSON object"):
        reg.log_event("x", payload={"bad": object()})


# ---- aliases and routing ---------------------------------------------------------------------------------------------
def test_alias_validation_and_generations(reg: Registry, art: list[Path]) -> None:
    v1 = reg.register("intent", art[0], base_fingerprint=BASE, state=S.stable)
    v2 = reg.register("intent", art[1], base_fingerprint=BASE, state=S.canary)
    v3 = reg.register("intent", art[2], base_fingerprint=BASE, state=S.shadow)
    with pytest.raises(InvalidRequestError, match=r"route weights of alias 'support' sum to 0\.9; they must sum to 1"):
        reg.set_alias("support", {v1.key: 0.8, v2.key: 0.1})
    with pytest.raises(InvalidRequestError, match=r"weight for 'intent@v2' must be a finite number >= 0, got -0\.1"):
        reg.set_alias("support", {v1.key: 1.1, v2.key: -0.1})
    with pytest.raises(InvalidRequestError, match="'intent-v1' is not of the form name@vN"):
        reg.set_alias("support", {"intent-v1": 1.0})
    with pytest.raises(NotFoundError, match="routes to intent@v9, which is not registered"):
        reg.set_alias("support", {"intent@v9": 1.0})
    with pytest.raises(InvalidRequestError, match="shadow_share is 0.5 but no shadow version"):
        reg.set_alias("support", {v1.key: 1.0}, shadow_share=0.5)
    with pytest.raises(InvalidRequestError, match="is also a live route"):
        reg.set_alias("support", {v1.key: 1.0}, shadow=v1.key, shadow_share=0.5)
    with pytest.raises(NotFoundError, match="alias 'support' does not exist"):
        reg.get_alias("support")

    a = reg.set_alias("support", {v1.key: 0.7, v2.key: 0.2 + 0.1})  # 0.2 + 0.1 != 0.3 exactly: within tolerance
    assert (a.generation, a.routes, a.shadow, a.capture_rate) == (1, {v1.key: 0.7, v2.key: 0.30000000000000004}, None,
                                                                   0.0)
    a = reg.set_alias("support", {v1.key: 0.5, v2.key: 0.5}, shadow=v3.key, shadow_share=0.25, reason="stage 2")
    assert (a.generation, a.shadow, a.shadow_share) == (2, v3.key, 0.25)
    a = reg.set_capture("support", 0.1, 100)
    assert (a.generation, a.capture_rate, a.capture_retention, a.routes) == (3, 0.1, 100, {v1.key: 0.5, v2.key: 0.5})
    assert reg.set_alias("support", {v1.key: 1.0}).capture_retention == 100  # capture settings survive route changes
    with pytest.raises(InvalidRequestError, match=r"rate must be a number in \[0, 1\], got 1.5"):
        reg.set_capture("support", 1.5, 10)
    with pytest.raises(InvalidRequestError, match="retention must be an integer >= 0, got -1"):
        reg.set_capture("support", 0.5, -1)
    ev = reg.events(alias="support", kind="alias_set")[1]
    assert ev.payload["previous"] == {v1.key: 0.7, v2.key: 0.30000000000000004}
    assert ev.payload["reason"] == "stage 2" and ev.payload["generation"] == 2
    reg.set_alias("other", {v1.key: 1.0})
    assert [x.alias for x in reg.aliases()] == ["other", "support"]
    reg.delete_alias("other")
    assert [x.alias for x in reg.aliases()] == ["support"]
    with pytest.raises(NotFoundError, match="alias 'other' does not exist"):
        reg.delete_alias("other")


def _alias(routes: dict[str, float], **kw: Any) -> Alias:
    fields: dict[str, Any] = {"shadow": None, "shadow_share": 0.0, "capture_rate": 0.0, "capture_retention": 0,
                              "generation": 1, "updated": 0.0, **kw}
    return Alias(alias="support", routes=routes, **fields)


def _within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_routing_is_sticky_monotone_and_matches_the_weights() -> None:
    callers = [f"user-{i}" for i in range(20_000)]
    on_canary_before: set[str] = set()
    for share in (0.05, 0.25, 0.5):
        # The stable version listed first: the order must come from the version numbers, not the dict.
        alias = _alias({"intent@v1": 1 - share, "intent@v2": share})
        chosen = {c: route(alias, c) for c in callers}
        on_canary = {c for c, k in chosen.items() if k == "intent@v2"}
        assert on_canary_before <= on_canary, "a caller left the canary while its weight grew"
        assert _within_binomial(len(on_canary), len(callers), share), (share, len(on_canary))
        assert {c: route(_alias({"intent@v2": share, "intent@v1": 1 - share}), c) for c in callers} == chosen
        on_canary_before = on_canary
    alias = _alias({"intent@v1": 0.5, "intent@v2": 0.5})
    assert [route(alias, "user-7")] * 3 == [route(alias, "user-7") for _ in range(3)]
    assert {route(_alias({"intent@v1": 0.0, "intent@v2": 1.0}), c) for c in callers[:500]} == {"intent@v2"}
    assert {route(_alias({"intent@v1": 1.0, "intent@v2": 0.0}), c) for c in callers[:500]} == {"intent@v1"}
    # The hash must never change silently: a release that did would move callers between versions.
    assert [route(alias, f"user-{i}") for i in range(6)] == GOLDEN_ROUTES


GOLDEN_ROUTES = ["intent@v1", "intent@v2", "intent@v2", "intent@v1", "intent@v2", "intent@v1"]


def test_three_way_routes_match_weights() -> None:
    alias = _alias({"a@v1": 0.6, "b@v2": 0.3, "a@v3": 0.1})
    counts: dict[str, int] = {}
    for i in range(20_000):
        k = route(alias, f"c{i}")
        counts[k] = counts.get(k, 0) + 1
    for key, w in alias.routes.items():
        assert _within_binomial(counts[key], 20_000, w), (key, counts)


def test_shadow_sampling_is_independent_of_routing() -> None:
    alias = _alias({"intent@v1": 0.5, "intent@v2": 0.5}, shadow="intent@v3", shadow_share=0.2)
    ids = [f"req-{i}" for i in range(20_000)]
    shadowed = [r for r in ids if in_shadow(alias, r)]
    assert _within_binomial(len(shadowed), len(ids), 0.2)
    on_v1 = [r for r in ids if route(alias, r) == "intent@v1"]
    assert _within_binomial(sum(in_shadow(alias, r) for r in on_v1), len(on_v1), 0.2)
    assert not any(in_shadow(_alias({"intent@v1": 1.0}), r) for r in ids[:1000])


def test_parse_key() -> None:
    assert parse_key("support-intent@v12") == ("support-intent", 12)
    for bad in ("x@v0", "x@1", "x", "@v1", "x@v1@v2"):
        with pytest.raises(InvalidRequestError, match="is not of the form name@vN"):
            parse_key(bad)


# ---- feedback and captures -------------------------------------------------------------------------------------------
def test_capture_keeps_the_newest_within_retention_with_feedback(reg: Registry, art: list[Path]) -> None:
    v1 = reg.register("intent", art[0], base_fingerprint=BASE, state=S.stable)
    reg.set_alias("support", {v1.key: 1.0})
    assert reg.capture("r0", "support", v1.key, "p", "o") is None  # retention 0: nothing kept
    reg.set_capture("support", 1.0, 3)
    ids = [reg.capture(f"r{i}", "support", v1.key, f"prompt {i}", f"out {i}", ts=100.0 - i) for i in range(5)]
    caps = reg.captures("support")
    assert [c.id for c in caps] == ids[2:] and [c.prompt for c in caps] == ["prompt 2", "prompt 3", "prompt 4"]
    reg.add_feedback("r3", label="billing", user="u1")
    reg.add_feedback("r3", score=0.2)  # newer, but no label: the label above still stands
    reg.add_feedback("r4", preferred="the corrected answer")
    reg.add_feedback("r3", label="refund")  # the newest label wins
    labelled = reg.captures("support", labelled_only=True)
    assert [(c.request_id, c.label, c.preferred, c.score) for c in labelled] == [
        ("r3", "refund", None, 0.2), ("r4", None, "the corrected answer", None)]
    reg.set_capture("support", 1.0, 1)  # lowering the retention trims at once
    assert [c.request_id for c in reg.captures("support")] == ["r4"]
    with pytest.raises(NotFoundError, match="alias 'nope' does not exist"):
        reg.capture("r9", "nope", v1.key, "p", "o")


def test_feedback_is_durable_and_validated(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with Registry(db) as r:
        fid = r.add_feedback("req-1", label="billing", alias="support", version_key="intent@v2", user="u")
        r.add_feedback("req-2", score=1, alias="other")
        with pytest.raises(InvalidRequestError, match="feedback for request 'req-3' needs at least one of label, "
                                                      "preferred or score"):
            r.add_feedback("req-3", alias="support")
        with pytest.raises(InvalidRequestError, match="score must be a finite number, got nan"):
            r.add_feedback("req-3", score=float("nan"))
    with pytest.raises(TsugikiError, match="is closed"):
        r.feedback()
    with Registry(db) as r:  # a fresh open, as after a restart
        (f,) = r.feedback(alias="support")
        assert (f.id, f.request_id, f.label, f.version_key, f.user) == (fid, "req-1", "billing", "intent@v2", "u")
        assert [x.request_id for x in r.feedback(since_id=fid)] == ["req-2"]


# ---- rollouts --------------------------------------------------------------------------------------------------------
def test_rollout_state_survives_restart_and_one_is_active_per_alias(tmp_path: Path, art: list[Path]) -> None:
    db = tmp_path / "r.db"
    with Registry(db) as r:
        v1 = r.register("intent", art[0], base_fingerprint=BASE, state=S.stable)
        v2 = r.register("intent", art[1], base_fingerprint=BASE)
        ro = r.start_rollout("support", v2.key, v1.key, plan={"stages": [0.05, 0.25, 0.5, 1.0]})
        assert (ro.stage, ro.state, ro.active) == (0, RolloutState.running, True)
        with pytest.raises(ConflictError, match=rf"'support' already has an active rollout \(id {ro.id}, intent@v2"):
            r.start_rollout("support", v2.key, v1.key)
        with pytest.raises(NotFoundError, match="names intent@v8, which is not registered"):
            r.start_rollout("elsewhere", "intent@v8")
        r.update_rollout(ro.id, stage=2, evidence={"errors": [0, 1]})
        r.set_alias("support", {v1.key: 1.0})
        with pytest.raises(ConflictError, match="has an active rollout"):
            r.delete_alias("support")
    with Registry(db) as r:  # the controller restarted
        ro2 = r.get_rollout("support")
        assert ro2 is not None and (ro2.id, ro2.stage, ro2.evidence, ro2.plan["stages"][2]) == (
            ro.id, 2, {"errors": [0, 1]}, 0.5)
        done = r.update_rollout(ro.id, state=RolloutState.promoted)
        assert not done.active and r.get_rollout("support") is None
        assert r.get_rollout("support", active_only=False) == done
        with pytest.raises(ConflictError, match="is promoted; a finished rollout cannot change"):
            r.update_rollout(ro.id, stage=3)
        nxt = r.start_rollout("support", v2.key, v1.key)  # the finished one no longer blocks a new one
        assert [x.id for x in r.rollouts("support")] == [ro.id, nxt.id]
        kinds = [(e.kind, e.payload.get("stage"), e.payload.get("state")) for e in r.events(alias="support")
                 if e.kind.startswith("rollout")]
        assert kinds == [("rollout_started", None, None), ("rollout_updated", 2, None),
                         ("rollout_updated", None, "promoted"), ("rollout_started", None, None)]


def test_threads_share_one_registry_object(reg: Registry) -> None:
    def work(t: int) -> None:
        for i in range(20):
            reg.log_event("thread", actor=f"t{t}", payload={"i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = reg.events(kind="thread")
    assert len(events) == 160 and len({e.id for e in events}) == 160


# ---- several processes -----------------------------------------------------------------------------------------------
WORKERS, VERSIONS_EACH, EVENTS_EACH = 4, 3, 15


def _writer(db: str, sources: list[str], worker: int, barrier: Any) -> None:
    with Registry(db) as r:
        barrier.wait(timeout=60)
        for i, src in enumerate(sources):
            r.register("shared", src, base_fingerprint=BASE, data_hash=f"w{worker}")
            for j in range(EVENTS_EACH // VERSIONS_EACH):
                r.log_event("tick", actor=f"w{worker}", payload={"i": i, "j": j})


def test_concurrent_writers_in_several_processes(tmp_path: Path) -> None:
    db = tmp_path / "reg" / "registry.db"
    Registry(db).close()  # create the schema once, so the workers race on data, not on migrations
    sources = [[str(make_adapter(tmp_path / f"w{w}-{i}", seed=1000 + 10 * w + i)) for i in range(VERSIONS_EACH)]
               for w in range(WORKERS)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_writer, args=(str(db), sources[w], w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    with Registry(db) as r:
        vs = r.versions("shared")
        assert [v.version for v in vs] == list(range(1, WORKERS * VERSIONS_EACH + 1))  # unique and gap-free
        assert len({v.digest for v in vs}) == len(vs)
        assert sorted(v.data_hash or "" for v in vs) == sorted(f"w{w}" for w in range(WORKERS)
                                                                for _ in range(VERSIONS_EACH))
        assert len(r.events(kind="tick")) == WORKERS * EVENTS_EACH
        assert len(r.events(kind="registered")) == WORKERS * VERSIONS_EACH
        for v in vs:
            assert r.artifacts.exists(v.artifact_uri)


def _crasher(db: str, ready: Any) -> None:
    r = Registry(db)
    r.log_event("committed")
    with r._write() as tx:  # the registry's own transaction wrapper, held open until the parent kills us
        tx.execute("INSERT INTO versions (name, version, digest, base_fingerprint, state, artifact_uri, created, "
                   "updated) VALUES ('half', 1, 'd', 'b', 'candidate', 'file:///x/half/d', 1.0, 1.0)")
        tx.execute("INSERT INTO events (ts, kind, actor) VALUES (1.0, 'uncommitted', 'crasher')")
        ready.set()
        time.sleep(120)


def test_a_writer_killed_mid_transaction_leaves_nothing_half_written(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Registry(db).close()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_crasher, args=(str(db), ready))
    p.start()
    try:
        assert ready.wait(timeout=60), "the child never reached its open transaction"
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.join(timeout=30)
    assert p.exitcode == -signal.SIGKILL
    with Registry(db) as r:
        assert r._read("PRAGMA integrity_check")[0][0] == "ok"
        assert [e.kind for e in r.events()] == ["committed"]
        assert r.versions() == []
        t0 = time.monotonic()
        r.log_event("after")  # the dead writer's lock is gone: this does not wait for the busy timeout
        assert time.monotonic() - t0 < 5


# ---- S3 (a real S3-compatible HTTP server: moto) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> tuple[Any, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"bkt-{request.node.name.replace('_', '-')[:40].lower()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def test_s3_round_trip_and_complete_marker(s3_endpoint: str, s3_bucket: tuple[Any, str], art: list[Path],
                                           tmp_path: Path) -> None:
    client, bucket = s3_bucket
    store = S3Artifacts(f"s3://{bucket}/adapters/prod", endpoint_url=s3_endpoint)
    digest = content_digest(art[0])
    (art[0] / "model_card.json").write_text('{"data_hash": "d1"}')
    (art[0] / "stray.pickle").write_bytes(b"never copied")
    uri = store.put("intent", art[0], digest)
    assert uri == f"s3://{bucket}/adapters/prod/intent/{digest}"
    assert store.exists(uri) and store.put("intent", art[0], digest) == uri
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"adapters/prod/intent/{digest}/{f}" for f in
                    (COMPLETE_MARKER, "adapter_config.json", "adapter_model.safetensors", "model_card.json")]
    out = store.fetch(uri, tmp_path / "out")
    assert content_digest(out) == digest
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "model_card.json"]

    # An upload that died before its marker is invisible, and the next put finishes it.
    d1 = content_digest(art[1])
    base = f"adapters/prod/intent/{d1}"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(str(art[1] / f), bucket, f"{base}/{f}")
    partial = store.uri_for("intent", d1)
    assert not store.exists(partial)
    with pytest.raises(AdapterError, match=rf"artifact {partial} does not exist or its upload never completed"):
        store.fetch(partial, tmp_path / "partial")
    assert store.put("intent", art[1], d1) == partial and store.exists(partial)

    # A tampered object is caught by the digest check, whatever S3 says.
    client.put_object(Bucket=bucket, Key=f"{base}/adapter_config.json", Body=b'{"peft_type": "LORA", "r": 3}')
    with pytest.raises(AdapterError, match=rf"artifact {partial} is corrupt"):
        store.fetch(partial, tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()


def test_registry_with_s3_artifacts(s3_endpoint: str, s3_bucket: tuple[Any, str], art: list[Path],
                                    tmp_path: Path) -> None:
    _, bucket = s3_bucket
    with Registry(tmp_path / "r.db", artifacts_from_uri(f"s3://{bucket}/reg", endpoint_url=s3_endpoint)) as r:
        v = r.register("intent", art[2], base_fingerprint=BASE)
        assert v.artifact_uri == f"s3://{bucket}/reg/intent/{v.digest}"
        assert r.register("intent", art[2], base_fingerprint=BASE) == v
        assert content_digest(r.fetch("intent", 1, tmp_path / "got")) == v.digest
        assert not (tmp_path / "r.db").parent.joinpath("artifacts", "intent").exists()  # nothing went to local disk


def test_s3_errors_map_to_project_errors(s3_endpoint: str, art: list[Path], tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config

    store = S3Artifacts("s3://no-such-bucket/p", endpoint_url=s3_endpoint)
    with pytest.raises(ArtifactStoreError, match="S3 transfer failed for s3://no-such-bucket/p/intent/.*NoSuchBucket"):
        store.put("intent", art[0], content_digest(art[0]))
    assert not store.exists(store.uri_for("intent", content_digest(art[0])))
    dead = boto3.client("s3", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1},
                                                                               connect_timeout=2))
    unreachable = S3Artifacts("s3://bkt/p", client=dead)
    with pytest.raises(ArtifactStoreError, match="S3 is unreachable for s3://bkt/p/intent/"):
        unreachable.exists(unreachable.uri_for("intent", "0" * 64))


# ---- outcomes, refreshes, values (schema 4) ---------------------------------------------------------------------
def test_outcomes_carry_feedback_correctness_and_backfill_feedback(reg: Registry, art: list[Path]) -> None:
    reg.register("intent", art[0], base_fingerprint=BASE)
    reg.set_alias("support", {"intent@v1": 1.0})
    reg.add_feedback("r1", label="Greeting ")  # arrives before the outcome is recorded
    reg.add_feedback("r2", score=0.0)
    reg.record_outcomes([
        {"request_id": "r1", "alias": "support", "version_key": "intent@v1", "ok": True, "output": " greeting",
         "latency_s": 0.1, "confidence": -0.5, "ts": 10.0},
        {"request_id": "r2", "alias": "support", "version_key": "intent@v1", "ok": True, "output": "x", "ts": 11.0},
        {"request_id": "r3", "alias": "support", "version_key": "intent@v1", "ok": False, "ts": 12.0},
        {"request_id": "r1", "alias": "support", "version_key": "intent@v1", "ok": True, "shadow": True,
         "agree": False, "ts": 10.5}])
    rows = reg.outcomes("intent@v1")
    assert [(r["request_id"], r["ok"], r["correct"]) for r in rows] == [("r1", True, True), ("r2", True, False),
                                                                        ("r3", False, None)]
    assert [r["request_id"] for r in reg.outcomes("intent@v1", since=10.9)] == ["r2", "r3"]
    assert [r["agree"] for r in reg.outcomes("intent@v1", shadow=True)] == [False]
    # a score judged the served answer: a shadow row of the same request is not credited with it
    reg.record_outcomes([{"request_id": "r2", "alias": "support", "version_key": "intent@v1", "ok": True,
                          "shadow": True, "output": "y", "ts": 11.5}])
    assert [r["correct"] for r in reg.outcomes("intent@v1", shadow=True)] == [None, None]
    assert {f.request_id: f.version_key for f in reg.feedback(alias="support")} == {"r1": "intent@v1",
                                                                                     "r2": "intent@v1"}
    assert reg.outcome_of("r1") == {"alias": "support", "version_key": "intent@v1"}
    with pytest.raises(InvalidRequestError, match="not of the form name@vN"):
        reg.record_outcomes([{"request_id": "r", "alias": "support", "version_key": "intent", "ok": True}])
    # a replica re-sending a batch it did not hear committed: each outcome and capture is kept once
    again = [{"request_id": "r3", "alias": "support", "version_key": "intent@v1", "ok": False, "ts": 12.0}]
    reg.record_outcomes(again)
    assert [r["request_id"] for r in reg.outcomes("intent@v1")] == ["r1", "r2", "r3"]
    reg.set_capture("support", 1.0, 10)
    first = reg.capture("r3", "support", "intent@v1", "p", "o", ts=12.0)
    assert reg.capture("r3", "support", "intent@v1", "p", "o", ts=12.0) == first and len(reg.captures("support")) == 1
    # ... but request ids are the caller's (x-request-id) and can repeat: another request with the same id, served
    # later, is another outcome and another capture
    reg.record_outcomes([{**again[0], "ts": 12.5}])
    assert [r["request_id"] for r in reg.outcomes("intent@v1")] == ["r1", "r2", "r3", "r3"]
    assert reg.capture("r3", "support", "intent@v1", "p2", "o2", ts=12.5) != first
    assert [c.prompt for c in reg.captures("support")] == ["p", "p2"]
    reg.record_outcomes([{"request_id": f"k{i}", "alias": "support", "version_key": "intent@v1", "ok": True}
                         for i in range(10)], keep=5)
    assert len(reg.outcomes("intent@v1", since=0)) == 5


def test_one_refresh_per_alias_at_a_time_and_values(reg: Registry, art: list[Path]) -> None:
    reg.register("intent", art[0], base_fingerprint=BASE)
    with pytest.raises(NotFoundError, match="alias 'support' does not exist"):
        reg.request_refresh("support", reason="drift", source="monitor")
    reg.set_alias("support", {"intent@v1": 1.0})
    first, new = reg.request_refresh("support", reason="drift", source="monitor")
    assert new and first.state == "requested"
    again, new = reg.request_refresh("support", reason="again", source="alertmanager")
    assert not new and again.id == first.id
    running = reg.update_refresh(first.id, state="running", detail={"data_path": "/d"})
    assert running.active and running.detail == {"data_path": "/d"}
    done = reg.update_refresh(first.id, state="done", candidate="intent@v2", detail={"why": "ok"})
    assert done.detail == {"data_path": "/d", "why": "ok"} and done.candidate == "intent@v2" and not done.active
    with pytest.raises(ConflictError, match="is done; a finished refresh cannot change"):
        reg.update_refresh(first.id, state="failed")
    assert reg.request_refresh("support", reason="later", source="operator")[1]
    kinds = [e.kind for e in reg.events(alias="support")]
    assert kinds.count("refresh_requested") == 2 and "refresh_done" in kinds
    assert reg.get_value("cursor", 0.0) == 0.0
    reg.set_value("cursor", 12.5)
    reg.set_value("cursor", 13.5)
    assert reg.get_value("cursor") == 13.5


def test_schema_5_migration_keeps_the_first_of_duplicated_outcomes_and_captures(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    conn = sqlite3.connect(db)
    for stmts in MIGRATIONS[:4]:
        for stmt in stmts:
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 4")
    for i in range(3):  # the same outcome and capture written three times (retried batches before schema 5)
        conn.execute("INSERT INTO outcomes (ts, request_id, alias, version_key, shadow, ok) "
                     "VALUES (?, 'r1', 'a', 'x@v1', 0, 1)", (float(i),))
        conn.execute("INSERT INTO captures (ts, request_id, alias, version_key, prompt, output) "
                     "VALUES (?, 'r1', 'a', 'x@v1', 'p', 'o')", (float(i),))
    conn.commit()
    conn.close()
    with Registry(db) as reg:
        assert reg.schema_version == SCHEMA_VERSION >= 5
        assert [r["ts"] for r in reg.outcomes("x@v1")] == [0.0]
        assert reg._read("SELECT COUNT(*) AS n FROM captures")[0]["n"] == 1
