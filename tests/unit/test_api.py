"""The HTTP API over an in-process ModelServer on the tiny model: OpenAI shapes, adapters, errors, auth."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from tests.helpers import metric_value
from tsugiki.config import load_settings
from tsugiki.serve.api import LocalClient, build_app
from tsugiki.serve.server import ModelServer

ADMIN = {"authorization": "Bearer admin-secret"}
USER = {"authorization": "Bearer user-secret"}


@pytest.fixture(scope="module")
def env(tiny_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    store = tmp_path_factory.mktemp("store")
    settings = load_settings(model={"base_model": str(tiny_dir), "served_name": "tiny"},
                             adapters={"store_dir": str(store), "roots": [str(adapter_root)]},
                             server={"api_keys": ["user-secret"], "admin_key": "admin-secret"})
    server = ModelServer(settings)
    registry = CollectorRegistry()
    app = build_app(LocalClient(server), settings.server, registry=registry)
    with TestClient(app) as client:
        yield client, server, registry
    server.shutdown()


def _metric(client: TestClient, name: str, **labels: str) -> float:
    return metric_value(client.get("/metrics").text, name, **labels)


def test_health_ready_models(env: tuple) -> None:
    client, _, _ = env
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["base_model"] == "tiny"
    models = client.get("/v1/models", headers=USER).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["parent"] is None
    assert r.headers["x-request-id"].startswith("req-")
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"


def test_completion_chat_stream_and_logprobs(env: tuple) -> None:
    client, _, _ = env
    r = client.post("/v1/completions", headers=USER,
                    json={"model": "tiny", "prompt": "the quick", "max_tokens": 5, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 5
    lp = body["choices"][0]["logprobs"]
    # legacy format: a dict per position, so two top tokens that decode to the same text collapse into one
    assert len(lp["tokens"]) == 5 and all(1 <= len(t) <= 2 for t in lp["top_logprobs"])
    assert body["id"] == f"cmpl-{r.headers['x-request-id']}"
    r = client.post("/v1/chat/completions", headers=USER,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                          "temperature": 0, "logprobs": True, "top_logprobs": 3})
    chat = r.json()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert len(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    with client.stream("POST", "/v1/chat/completions", headers=USER,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                             "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == chat["choices"][0]["message"]["content"]


def test_adapter_lifecycle_and_per_adapter_metrics(env: tuple, lora_all: Path, lora_other: Path,
                                                   adapter_root: Path) -> None:
    client, _, _ = env
    req = {"model": "intent", "prompt": "the quick brown", "max_tokens": 6, "temperature": 0}
    assert client.post("/v1/completions", headers=USER, json=req).status_code == 404
    r = client.post("/v1/adapters", headers=ADMIN, json={"name": "intent", "path": str(lora_all)})
    assert r.status_code == 201 and r.json()["version"] == 1
    first = client.post("/v1/completions", headers=USER, json=req).json()["choices"][0]["text"]
    base = client.post("/v1/completions", headers=USER, json={**req, "model": "tiny"}).json()["choices"][0]["text"]
    assert first != base
    models = {m["id"]: m for m in client.get("/v1/models", headers=USER).json()["data"]}
    assert models["intent"]["parent"] == "tiny" and models["intent"]["version"] == 1
    # a changed adapter under the same name is a new version; the old weights are never served again
    staging = adapter_root / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(lora_other, staging)
    r = client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "intent", "lora_path": str(staging)})
    assert r.status_code == 200 and "added successfully" in r.text
    assert client.get("/v1/adapters", headers=ADMIN).json()["data"][0]["version"] == 2
    second = client.post("/v1/completions", headers=USER, json=req).json()["choices"][0]["text"]
    assert second != first
    assert _metric(client, "tsugiki_requests_total", adapter="intent", outcome="success") == 2
    assert _metric(client, "tsugiki_completion_tokens_total", adapter="intent") == 12
    assert _metric(client, "tsugiki_adapters_loaded") >= 1
    assert _metric(client, "tsugiki_adapter_load_seconds_count") >= 2
    r = client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "intent"})
    assert r.status_code == 200
    assert client.post("/v1/completions", headers=USER, json=req).status_code == 404
    assert client.delete("/v1/adapters/intent", headers=ADMIN).status_code == 404


BAD = [
    ("malformed json", "/v1/completions", "{not json", 400, "not valid JSON"),
    ("wrong type", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "does not exist"),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": "hello " * 400}, 400,
     "maximum context length is 256"),
    ("prompt + max_tokens too long", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 255}, 400,
     "maximum context length"),
    ("max_tokens zero", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over limit", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400,
     "above this server's limit"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "at least one message"),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "role"),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "non-empty"),
    ("temperature out of range", "/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 9}, 400,
     "temperature"),
    ("body not an object", "/v1/completions", "[1, 2]", 400, "JSON object"),
    ("lone surrogate", "/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', 400, "lone UTF-16 surrogate"),
    ("lone surrogate in a message", "/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "'\\udfff'"),
    ("seed beyond a generator's range", "/v1/completions", {"model": "tiny", "prompt": "hi", "seed": 2**64}, 400,
     "seed"),
    ("integer beyond Python's digit limit", "/v1/completions", '{"model": "tiny", "prompt": "hi", "seed": '
     + "9" * 5000 + "}", 400, "not valid JSON"),
    ("echo", "/v1/completions", {"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo is not supported"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs"),
    ("unknown route", "/v1/nothing", {}, 404, "Not Found"),
    ("arrays nested too deep to parse", "/v1/completions", '{"model": "tiny", "prompt": ' + "[" * 100000 + "}",
     400, "nests arrays or objects too deeply"),
    ("a tiny temperature", "/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 1e-300}, 200, ""),
]


@pytest.mark.parametrize("what, path, body, status, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(env: tuple, what: str, path: str, body: object, status: int,
                                     match: str) -> None:
    client, _, _ = env
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post(path, headers=USER, **kw)
    assert r.status_code == status, r.text
    if status == 200:  # accepted input that must not break the replica
        assert r.json()["choices"][0]["text"] is not None
        return
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and match in err["message"]
    assert "x-request-id" in r.headers
    ok = client.post("/v1/completions", headers=USER, json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200  # still serving


@pytest.mark.parametrize("what, body, status, match", [
    ("missing path", {"name": "x", "path": "/definitely/not/here"}, 403, "outside the allowed adapter roots"),
    ("outside roots", {"name": "x", "path": "/etc"}, 403, "outside the allowed adapter roots"),
    ("relative path", {"name": "x", "path": "a/b"}, 400, "must be absolute"),
    ("bad name", {"name": "../etc", "path": "/tmp"}, 400, "adapter name '../etc' is invalid"),
])
def test_bad_adapter_requests(env: tuple, what: str, body: dict, status: int, match: str) -> None:
    client, _, _ = env
    r = client.post("/v1/adapters", headers=ADMIN, json=body)
    assert r.status_code == status and match in r.json()["error"]["message"]


def test_corrupt_and_foreign_adapters_are_refused_and_replica_keeps_serving(env: tuple, adapter_root: Path,
                                                                           foreign_lora: Path,
                                                                           lora_all: Path) -> None:
    client, _, _ = env
    corrupt = adapter_root / "corrupt"
    shutil.rmtree(corrupt, ignore_errors=True)
    shutil.copytree(lora_all, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage" * 50)
    r = client.post("/v1/adapters", headers=ADMIN, json={"name": "c", "path": str(corrupt)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_adapter"
    foreign = adapter_root / "foreign"
    shutil.rmtree(foreign, ignore_errors=True)
    shutil.copytree(foreign_lora, foreign)
    r = client.post("/v1/adapters", headers=ADMIN, json={"name": "f", "path": str(foreign)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_mismatch"
    missing = adapter_root / "missing"
    r = client.post("/v1/adapters", headers=ADMIN, json={"name": "m", "path": str(missing)})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    assert not {"c", "f", "m"} & {a["name"] for a in client.get("/v1/adapters", headers=ADMIN).json()["data"]}
    ok = client.post("/v1/completions", headers=USER, json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_an_adapters_lexicon_corrects_what_the_model_reads(env: tuple, lora_all: Path, adapter_root: Path) -> None:
    from tsugiki.adapters.lexicon import Lexicon
    from tsugiki.tuning.data import label_prompt

    client, server, _ = env
    spell = adapter_root / "spell"
    shutil.rmtree(spell, ignore_errors=True)
    shutil.copytree(lora_all, spell)
    Lexicon.build(["what is my account balance", "freeze my card"]).save(spell)
    for name, path in (("spell", spell), ("nospell", lora_all)):  # the same weights, with and without a lexicon
        assert client.post("/v1/adapters", headers=ADMIN, json={"name": name, "path": str(path)}).status_code == 201
    typo, fixed = "what is my acount balnce", "what is my account balance"
    assert server._prompt_ids({"prompt": typo}) != server._prompt_ids({"prompt": fixed})  # the fix is visible
    req = {"max_tokens": 4, "temperature": 0, "logprobs": 1}

    def complete(model: str, prompt: str) -> tuple[dict, dict]:
        r = client.post("/v1/completions", headers=USER, json={**req, "model": model, "prompt": prompt})
        assert r.status_code == 200, r.text
        return r.json(), dict(r.headers)

    served, headers = complete("spell", typo)
    want, _ = complete("nospell", fixed)
    raw, raw_headers = complete("nospell", typo)
    # the model behind the lexicon read the corrected words: the same prompt tokens, tokens and log-probabilities
    assert served["usage"] == want["usage"] and served["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]
    assert headers["x-tsugiki-corrected-words"] == "2" and "x-tsugiki-corrected-words" not in raw_headers
    assert raw["choices"][0]["logprobs"] != want["choices"][0]["logprobs"]
    # a label-template prompt: only the user's words are looked at; a chat: only the user's messages
    _, headers = complete("spell", label_prompt(typo))
    assert headers["x-tsugiki-corrected-words"] == "2"
    r = client.post("/v1/chat/completions", headers=USER, json={"model": "spell", "max_tokens": 1, "messages": [
        {"role": "system", "content": "acount balnce"}, {"role": "user", "content": "freeze my crad"}]})
    assert r.status_code == 200 and r.headers["x-tsugiki-corrected-words"] == "1"
    assert _metric(client, "tsugiki_corrected_words_total", adapter="spell") == 5
    # a lexicon that cannot be read is refused when the adapter is loaded, with the fix
    (spell / "lexicon.json").write_text("{oops")
    r = client.post("/v1/adapters", headers=ADMIN, json={"name": "badlex", "path": str(spell)})
    assert r.status_code == 400 and "rebuild it with `tsugiki tune` or remove it" in r.json()["error"]["message"]
    # one that broke in the store after loading (another replica reads it on first use) serves without correction
    stored = server.store.path_of(server.store.require("spell"))
    (stored / "lexicon.json").write_text("{oops")
    server._lexicons.clear()
    served, headers = complete("spell", typo)
    assert "x-tsugiki-corrected-words" not in headers
    assert served["choices"][0]["logprobs"] == raw["choices"][0]["logprobs"]
    for name in ("spell", "nospell"):
        client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": name})


def test_access_control(env: tuple, lora_all: Path) -> None:
    client, _, _ = env
    req = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    before = _metric(client, "tsugiki_requests_total", adapter="tiny")
    r = client.post("/v1/completions", json=req)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/completions", json=req, headers={"authorization": "Bearer wrong"}).status_code == 401
    # the inference key does not manage adapters
    r = client.post("/v1/adapters", headers=USER, json={"name": "x", "path": str(lora_all)})
    assert r.status_code == 401 and "adapter management" in r.json()["error"]["message"]
    assert client.get("/v1/adapters", headers=USER).status_code == 401
    assert _metric(client, "tsugiki_requests_total", adapter="tiny") == before  # refused before inference
    assert client.post("/v1/completions", json=req, headers=USER).status_code == 200


def test_noise_headers_and_monitor_endpoints(tiny_dir: Path, tmp_path: Path) -> None:
    from tsugiki.monitoring.monitor import Monitor, MonitorConfig

    monitor = Monitor(MonitorConfig(state_dir=tmp_path / "mon", drift={"reference_size": 50, "ert": 1000},
                                    save_interval_s=0))

    async def sink(batch: list) -> None:
        monitor.observe(batch)

    settings = load_settings(model={"base_model": str(tiny_dir), "served_name": "tiny"},
                             adapters={"store_dir": str(tmp_path / "store")})
    server = ModelServer(settings, monitor_sink=sink)
    try:
        with TestClient(build_app(LocalClient(server, monitor), settings.server)) as client:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "what is my balance", "max_tokens": 1})
            assert r.headers["x-tsugiki-noise-reasons"] == "none" and float(r.headers["x-tsugiki-noise-score"]) < 1
            r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "messages": [
                {"role": "user", "content": "pleeeeeease helllllllp meeeeee nowwwwww"}]})
            assert "repetition" in r.headers["x-tsugiki-noise-reasons"].split(",")
            for i in range(55):
                client.post("/v1/completions", json={"model": "tiny", "prompt": f"hello world {i}", "max_tokens": 1})

            def seen() -> float:
                return monitor.registry.get_sample_value("tsugiki_monitor_observations_total", {"adapter": "tiny"})

            deadline = time.monotonic() + 10
            while (seen() or 0) < 57 and time.monotonic() < deadline:
                time.sleep(0.1)  # the shipper flushes every 0.5 s, off the request path
            status = client.get("/v1/monitor/adapters/tiny").json()
            assert status["state"] == "monitoring" and status["requests_seen"] == 7
            assert client.get("/v1/monitor/events").json() == {"object": "list", "data": []}
            assert client.get("/v1/monitor/events?limit=0").status_code == 400
            assert client.get("/v1/monitor/adapters/nope").status_code == 404
            assert _metric(client, "tsugiki_noisy_requests_total", adapter="tiny", reason="repetition") == 1
            assert _metric(client, "tsugiki_drift_reference_ready", adapter="tiny") == 1
            assert client.post("/v1/monitor/adapters/tiny/reset").json()["alarm"] is False
            assert client.post("/v1/monitor/adapters/nope/reset").status_code == 404  # as its status is
    finally:
        server.shutdown()


def test_a_chat_template_that_refuses_the_messages_is_a_400(env: tuple) -> None:
    """Some models' templates raise on conversations they do not take (a system role, roles that do not
    alternate): the caller gets a 400 naming the reason, not a 500."""
    client, server, _ = env
    tok = server.tokenizer
    old = tok.chat_template
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    try:
        body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", headers=USER,
                        json={**body, "messages": [{"role": "system", "content": "x"}, *body["messages"]]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "System role not supported" in err["message"]
        assert client.post("/v1/chat/completions", headers=USER, json=body).status_code == 200
    finally:
        tok.chat_template = old


def test_a_text_longer_than_the_context_is_not_read_through_the_lexicon() -> None:
    from tsugiki.adapters.lexicon import Lexicon

    lex = Lexicon.build(["what is my account balance"])
    payload = {"prompt": "what is my acount balnce"}
    fixed, n = ModelServer._recognised(payload, lex, 5)
    assert fixed["prompt"] == "what is my account balance" and n == 2
    # more words than the context has tokens: the length check refuses it anyway, so no time goes into it
    assert ModelServer._recognised(payload, lex, 4) == (payload, 0)


def test_admin_integers_beyond_the_registry_are_refused(env: tuple) -> None:
    client, _, _ = env
    for url in ("/v1/registry/events?since_id=1e3", "/v1/monitor/events?limit=abc", "/v1/feedback?limit=x"):
        r = client.get(url, headers=ADMIN)  # a query parameter of the wrong type: the OpenAI error shape, not 422
        assert r.status_code == 400, (url, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] in url and "integer" in err["message"]
    r = client.get("/v1/registry/events?since_id=10000000000000000000000", headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "since_id"
    r = client.put("/v1/aliases/a/capture", headers=ADMIN, json={"rate": 0.5, "retention": 1e30})
    assert r.status_code == 400 and "retention" in r.json()["error"]["message"]


class _DiesMidStream(LocalClient):
    """The model replica's stream breaks after its first token (a replica dying, a Ray error)."""

    async def generate(self, payload: dict):  # type: ignore[override]
        n = 0
        async for ev in self.server.generate(payload):
            yield ev
            n += 1
            if n == 2:
                raise RuntimeError("replica died")


def test_a_stream_that_breaks_ends_with_an_error_event_and_done(env: tuple) -> None:
    _, server, _ = env
    settings = load_settings(model={"served_name": "tiny"}, server={"api_keys": ["user-secret"]})
    registry = CollectorRegistry()
    with TestClient(build_app(_DiesMidStream(server), settings.server, registry=registry)) as client:
        r = client.post("/v1/completions", headers=USER, json={"model": "tiny", "prompt": "the quick",
                                                               "max_tokens": 8, "stream": True})
        lines = [ln for ln in r.text.split("\n") if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "internal_error"
        assert _metric(client, "tsugiki_requests_total", adapter="tiny", outcome="server_error") == 1
