"""The real gateway: `tsugiki serve` (Ray Serve over HTTP) with the real default model, driven by the official
`openai` client, plus a real Prometheus scraping it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, API_KEY, Gateway, free_port, wait_for
from tests.integration.conftest import metric as url_metric

pytestmark = pytest.mark.integration
BASE = "SmolLM2-135M-Instruct"


def metric(gw: Gateway, name: str, **labels: str) -> float:
    return url_metric(gw.url, name, **labels)


def test_chat_completion_and_streaming_with_openai_client(gateway: Gateway) -> None:
    client = gateway.client()
    assert [m.id for m in client.models.list().data][0] == BASE
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=20, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text and r.usage.prompt_tokens > 10 and r.usage.completion_tokens <= 20
    stream = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == text and usage.completion_tokens == r.usage.completion_tokens
    c = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2, stop=["\n"])
    assert c.choices[0].logprobs.token_logprobs[0] < 0
    raw = client.chat.completions.with_raw_response.create(model=BASE, messages=msgs, max_tokens=1)
    assert raw.headers.get("x-request-id")
    seeded = [client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                        seed=11).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_adapter_hot_load_unload_and_per_adapter_metrics(gateway: Gateway, real_adapters: dict[str, Path]) -> None:
    client = gateway.client()
    prompt = dict(prompt="Book a flight to Tokyo", max_tokens=8, temperature=0)
    base_text = client.completions.create(model=BASE, **prompt).choices[0].text
    # vLLM's endpoint, as vLLM tooling calls it
    r = gateway.admin("POST", "/v1/load_lora_adapter", json={"lora_name": "lora0", "lora_path":
                                                               str(real_adapters["lora0"])})
    assert r.status_code == 200, r.text
    # the CLI, as an operator calls it
    out = subprocess.run([sys.executable, "-m", "tsugiki.cli", "adapters", "load", "lora1", str(real_adapters["lora1"]),
                          "--url", gateway.url, "--key", ADMIN_KEY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "loaded lora1 v1" in out.stdout, out.stderr
    models = {m.id: m for m in client.models.list().data}
    assert models["lora0"].model_extra["parent"] == BASE and models["lora1"].model_extra["version"] == 1
    t0 = client.completions.create(model="lora0", **prompt).choices[0].text
    t1 = client.completions.create(model="lora1", **prompt).choices[0].text
    assert t0 != base_text and t1 != base_text and t0 != t1
    wait_for(lambda: metric(gateway, "tsugiki_adapters_loaded") >= 2)
    # gateway replicas push their request metrics to the hub like model replicas (every 2 s)
    wait_for(lambda: metric(gateway, "tsugiki_requests_total", adapter="lora1", outcome="success") == 1)
    assert metric(gateway, "tsugiki_requests_total", adapter="lora0", outcome="success") == 1
    assert metric(gateway, "tsugiki_completion_tokens_total", adapter="lora1") == 8
    assert metric(gateway, "tsugiki_time_to_first_token_seconds_count", adapter="lora0") == 1
    assert metric(gateway, "tsugiki_adapter_load_seconds_count") >= 2
    listing = subprocess.run([sys.executable, "-m", "tsugiki.cli", "adapters", "list", "--url", gateway.url, "--key",
                              ADMIN_KEY], capture_output=True, text=True, timeout=60)
    assert "lora0" in listing.stdout and "lora1" in listing.stdout
    assert gateway.admin("DELETE", "/v1/adapters/lora1").status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="lora1", **prompt)


def test_mixed_adapters_share_batches(gateway: Gateway, real_adapters: dict[str, Path]) -> None:
    r = gateway.admin("POST", "/v1/adapters", json={"name": "lora2", "path": str(real_adapters["lora2"])})
    assert r.status_code == 201, r.text
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    before = metric(gateway, "tsugiki_batch_size_sum"), metric(gateway, "tsugiki_batch_size_count")

    async def go() -> list[str]:
        models = [BASE, "lora0", "lora2"] * 3
        rs = await asyncio.gather(*(client.completions.create(model=m, prompt="Set an alarm for", max_tokens=16,
                                                              temperature=0) for m in models))
        return [x.choices[0].text for x in rs]

    texts = asyncio.run(go())
    assert texts[0] == texts[3] == texts[6] and texts[1] == texts[4] and texts[2] == texts[5]
    alone = gateway.client().completions.create(model="lora2", prompt="Set an alarm for", max_tokens=16,
                                                temperature=0).choices[0].text
    assert alone == texts[2]  # a row in a mixed batch answers as the adapter does alone

    def mean_batch() -> float:
        s = metric(gateway, "tsugiki_batch_size_sum") - before[0]
        n = metric(gateway, "tsugiki_batch_size_count") - before[1]
        return s / n if n else 0.0

    wait_for(lambda: mean_batch() > 0)
    assert mean_batch() > 1.5  # concurrent requests for different adapters were decoded together


BAD = [
    ("unknown model", dict(model="nope", prompt="hi"), openai.NotFoundError, "does not exist"),
    ("prompt too long", dict(model=BASE, prompt="hello " * 3000), openai.BadRequestError, "maximum context length"),
    ("max_tokens out of range", dict(model=BASE, prompt="hi", max_tokens=10**6), openai.BadRequestError,
     "above this server's limit"),
    ("wrong type", dict(model=BASE, prompt="hi", temperature="hot"), openai.BadRequestError, "temperature"),
]


@pytest.mark.parametrize("what, kw, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_get_4xx_and_the_server_keeps_serving(gateway: Gateway, what, kw, exc, match) -> None:
    client = gateway.client()
    with pytest.raises(exc, match=match) as e:
        client.completions.create(**kw)
    assert set(e.value.body) >= {"message", "type", "param", "code"}
    assert client.completions.create(model=BASE, prompt="hi", max_tokens=1).choices[0].finish_reason == "length"


def test_bad_requests_over_raw_http(gateway: Gateway, real_adapters: dict[str, Path], tmp_path: Path) -> None:
    h = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    r = httpx.post(gateway.url + "/v1/chat/completions", content=b"{oops", headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": BASE, "messages": []}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.AuthenticationError):
        gateway.client(key="wrong").models.list()
    # adapter management: wrong key, path outside roots, missing, corrupt, foreign
    r = httpx.post(gateway.url + "/v1/adapters", json={"name": "x", "path": str(real_adapters["lora0"])}, headers=h)
    assert r.status_code == 401
    assert gateway.admin("POST", "/v1/adapters", json={"name": "x", "path": str(tmp_path)}).status_code == 403
    missing = gateway.admin("POST", "/v1/adapters", json={"name": "x", "path": str(gateway.roots / "nothing")})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "adapter_not_found"
    corrupt = gateway.roots / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "adapter_config.json").write_text((real_adapters["lora0"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    r = gateway.admin("POST", "/v1/adapters", json={"name": "x", "path": str(corrupt)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_adapter"
    from tests.helpers import make_lora, make_tiny_llama

    foreign = make_lora(make_tiny_llama(tmp_path / "tiny"), gateway.roots / "foreign", seed=1)
    r = gateway.admin("POST", "/v1/adapters", json={"name": "x", "path": str(foreign)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_mismatch"
    assert gateway.client().completions.create(model=BASE, prompt="hi", max_tokens=1).choices[0].text is not None


def test_real_prometheus_scrapes_the_gateway(gateway: Gateway, prometheus_bin: str, tmp_path: Path) -> None:
    target = gateway.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: tsugiki\n    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    proc = subprocess.Popen([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prom.log").open("w"))
    try:
        gateway.client().completions.create(model=BASE, prompt="hello", max_tokens=2)

        def query(q: str) -> list:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=5)
                return r.json()["data"]["result"] if r.status_code == 200 else []
            except httpx.HTTPError:
                return []

        wait_for(lambda: query('up{job="tsugiki"} == 1'), timeout=60)
        wait_for(lambda: query(f'tsugiki_requests_total{{adapter="{BASE}",outcome="success"}}'), timeout=60)
        wait_for(lambda: query("tsugiki_batch_size_count"), timeout=60)
        health = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
        assert health["data"]["activeTargets"][0]["lastError"] == ""
    finally:
        proc.terminate()
        proc.wait(30)
