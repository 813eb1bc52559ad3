"""Engine tests on a tiny random llama: mixed-adapter batches equal each adapter alone, continuous batching,
sampling controls, adapter residency."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsugiki.adapters.store import AdapterStore
from tsugiki.config import AdapterConfig, EngineConfig
from tsugiki.errors import EngineError, ModelNotFoundError, OverloadedError, TsugikiError
from tsugiki.serve.engine import EngineCore, GenerationRequest, TokenEvent
from tsugiki.serve.sampling import SamplingParams, sample_rows

# float32 on CPU: a mixed batch computes the same math in a different order (batched matmuls, padding), so
# logits agree to ~1e-5; 1e-4 on log-probabilities is far below any real difference between adapters (> 1e-1).
TOL = 1e-4
PROMPTS = ["the quick brown fox", "what is the capital", "hello world, how are", "book a flight to tokyo",
           "set an alarm", "paris"]


def _core(tiny_dir: Path, store: AdapterStore | None, **engine: object) -> EngineCore:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return EngineCore(model, tok, engine_cfg=EngineConfig(**engine), adapter_cfg=AdapterConfig(max_loaded=4),
                      store=store, max_model_len=256, base_name="tiny")


class Collector:
    def __init__(self) -> None:
        self.events: dict[str, list[TokenEvent]] = {}
        self.errors: dict[str, TsugikiError] = {}

    def sink(self, rid: str):
        def f(ev: TokenEvent | TsugikiError) -> None:
            if isinstance(ev, TsugikiError):
                self.errors[rid] = ev
            else:
                self.events.setdefault(rid, []).append(ev)
        return f

    def tokens(self, rid: str) -> list[int]:
        return [e.token_id for e in self.events[rid] if e.token_id is not None]

    def text(self, rid: str) -> str:
        return "".join(e.text for e in self.events[rid])


def _reference(tiny_dir: Path, adapter_dir: Path | None, prompt_ids: list[int],
               n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from a plain transformers/PEFT model running this request alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = list(prompt_ids)
    out, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(torch.argmax(logits))
            out.append(t)
            lps.append(float(lp[t]))
            ids.append(t)
    return out, lps


@pytest.fixture()
def store(tmp_path: Path, lora_all: Path, lora_qv: Path) -> AdapterStore:
    s = AdapterStore(tmp_path / "store")
    s.put("all", lora_all)
    s.put("qv", lora_qv)
    return s


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny_dir: Path, store: AdapterStore, lora_all: Path,
                                                       lora_qv: Path) -> None:
    core = _core(tiny_dir, store)
    tok = core.tokenizer
    plan = [(None, None), ("all", lora_all), ("qv", lora_qv), ("all", lora_all), (None, None), ("qv", lora_qv)]
    col = Collector()
    n_new = [6, 9, 12, 7, 10, 8]
    # Requests join the running batch at different steps (continuous batching) and leave at different lengths.
    for i, ((name, _), prompt) in enumerate(zip(plan, PROMPTS)):
        p = SamplingParams(max_tokens=n_new[i], temperature=0.0, logprobs=True, ignore_eos=True)
        core.add_request(GenerationRequest(str(i), tuple(tok(prompt)["input_ids"]), p, name), col.sink(str(i)))
        if i % 2:
            core.step()
    while core.has_work():
        core.step()
    assert not col.errors
    for i, ((name, adir), prompt) in enumerate(zip(plan, PROMPTS)):
        ref_tokens, ref_lps = _reference(tiny_dir, adir, tok(prompt)["input_ids"], n_new[i])
        assert col.tokens(str(i)) == ref_tokens, f"row {i} ({name}) diverged"
        got = [e.logprob for e in col.events[str(i)]]
        assert max(abs(a - b) for a, b in zip(got, ref_lps)) < TOL
    # the adapters really change the output (otherwise the test above proves nothing)
    base_tokens, _ = _reference(tiny_dir, None, tok(PROMPTS[1])["input_ids"], 9)
    assert base_tokens != col.tokens("1")


def test_stop_strings_max_tokens_and_eos(tiny_dir: Path) -> None:
    core = _core(tiny_dir, None)
    tok = core.tokenizer
    ids = tuple(tok("the quick brown")["input_ids"])
    col = Collector()
    core.add_request(GenerationRequest("free", ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
                     col.sink("free"))
    while core.has_work():
        core.step()
    full = col.text("free")
    assert col.events["free"][-1].finish_reason == "length" and len(col.tokens("free")) == 12
    stop = full[3:5] if len(full) >= 5 else full[-1:]
    core.add_request(GenerationRequest("stop", ids, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,),
                                                                   ignore_eos=True)), col.sink("stop"))
    while core.has_work():
        core.step()
    assert col.events["stop"][-1].finish_reason == "stop"
    assert col.text("stop") == full[: full.find(stop)]


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_dir: Path) -> None:
    core = _core(tiny_dir, None)
    ids = tuple(core.tokenizer("hello world")["input_ids"])
    col = Collector()
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    core.add_request(GenerationRequest("a", ids, p), col.sink("a"))
    core.add_request(GenerationRequest("noise", ids, SamplingParams(max_tokens=5, temperature=1.0)),
                     col.sink("noise"))
    while core.has_work():
        core.step()
    core.add_request(GenerationRequest("b", ids, p), col.sink("b"))
    while core.has_work():
        core.step()
    assert col.tokens("a") == col.tokens("b")
    core.add_request(GenerationRequest("c", ids, SamplingParams(max_tokens=10, temperature=1.0, seed=8,
                                                                ignore_eos=True)), col.sink("c"))
    while core.has_work():
        core.step()
    assert col.tokens("c") != col.tokens("a")


def test_abort_frees_the_slot(tiny_dir: Path, store: AdapterStore) -> None:
    core = _core(tiny_dir, store)
    ids = tuple(core.tokenizer("hello")["input_ids"])
    col = Collector()
    req = GenerationRequest("x", ids, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True), "all")
    core.add_request(req, col.sink("x"))
    core.step()
    core.abort(req)
    core.step()
    assert col.events["x"][-1].finish_reason == "abort" and not core.has_work()
    assert not any(core.cache.pinned(r) for r in core.cache.refs())


@pytest.mark.parametrize("batch, gone", [(8, "second"), (1, "first"), (1, "second")],
                         ids=["both running", "running aborted, queued kept", "queued aborted, running kept"])
def test_abort_spares_other_requests_with_the_same_id(tiny_dir: Path, batch: int, gone: str) -> None:
    """Request ids come from callers (``x-request-id``) and can repeat: aborting one request (its client went
    away) must leave another with the same id, running or still queued, to finish."""
    core = _core(tiny_dir, None, max_batch_size=batch)
    ids = tuple(core.tokenizer("hello")["input_ids"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = {"first": GenerationRequest("same", ids, params), "second": GenerationRequest("same", ids, params)}
    col = Collector()
    for name, req in reqs.items():
        core.add_request(req, col.sink(name))
    core.step()  # with a batch of 1, "second" is still queued here
    core.abort(reqs[gone])
    while core.has_work():
        core.step()
    kept = "first" if gone == "second" else "second"
    if gone in col.events:
        assert col.events[gone][-1].finish_reason == "abort"
    else:  # dropped from the queue before it started: its caller is gone, nothing to tell it
        assert (batch, gone) == (1, "second")
    assert col.events[kept][-1].finish_reason == "length" and len(col.tokens(kept)) == 6


def test_lru_residency_under_pressure(tiny_dir: Path, store: AdapterStore) -> None:
    core = _core(tiny_dir, store)
    core.cache.capacity = 1
    ids = tuple(core.tokenizer("hello")["input_ids"])
    col = Collector()
    core.add_request(GenerationRequest("a", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                                       "all"), col.sink("a"))
    core.add_request(GenerationRequest("b", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                                       "qv"), col.sink("b"))
    core.step()
    assert core.num_running == 1 and core.num_waiting == 1  # "qv" waits: the only slot is pinned by "all"
    while core.has_work():
        core.step()
    assert len(col.tokens("a")) == 4 and len(col.tokens("b")) == 4
    assert [r.name for r in core.cache.refs()] == ["qv"]
    qv_key = core.cache.refs()[0].slot
    assert all(set(layer.lora_A) <= {qv_key} for layer in core.lora_layers.values())
    assert any(layer.lora_A for layer in core.lora_layers.values())


def test_an_install_that_fails_part_way_leaves_nothing_resident(tiny_dir: Path, store: AdapterStore,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory while an adapter's layers are being filled: the adapter is not recorded as resident with
    some layers only (which would serve it silently wrong), and the next attempt installs it whole."""
    core = _core(tiny_dir, store)
    ref = store.require("all")
    layers = list(core.lora_layers.values())
    real, calls = type(layers[0]).add_adapter, []

    def oom_on_the_third(self: object, *a: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        real(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(type(layers[0]), "add_adapter", oom_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        core.ensure_resident(ref)
    assert ref not in core.cache and not any(layer.lora_A for layer in layers)
    monkeypatch.setattr(type(layers[0]), "add_adapter", real)
    assert core.ensure_resident(ref) and ref in core.cache
    assert sum(ref.slot in layer.lora_A for layer in layers) > 3


def test_a_direct_version_and_a_registry_version_with_one_number_serve_their_own_weights(
        tiny_dir: Path, store: AdapterStore, lora_other: Path) -> None:
    """`tsugiki tune --name all` made all@v1 here; the registry's all@v1 is other content: both resident at once,
    each request gets its own version's weights (keyed by version and digest, not by the number alone)."""
    from tsugiki.adapters.format import content_digest

    core = _core(tiny_dir, store)
    direct = store.require("all")
    reg = store.put("all", lora_other, digest=content_digest(lora_other), version=direct.version, activate=False)
    assert reg.key == direct.key and reg.digest != direct.digest
    ids = tuple(core.tokenizer("the quick brown fox")["input_ids"])
    col = Collector()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    core.add_request(GenerationRequest("direct", ids, params, "all"), col.sink("direct"))
    core.add_request(GenerationRequest("registry", ids, params, version=reg), col.sink("registry"))
    while core.has_work():
        core.step()
    assert len(core.cache) == 2
    assert col.tokens("registry") == _reference(tiny_dir, lora_other, list(ids), 6)[0]
    assert col.tokens("direct") != col.tokens("registry")


def test_unloaded_adapter_fails_queued_request_and_queue_limit(tiny_dir: Path, store: AdapterStore) -> None:
    core = _core(tiny_dir, store, max_waiting=1)
    ids = tuple(core.tokenizer("hello")["input_ids"])
    col = Collector()
    core.add_request(GenerationRequest("a", ids, SamplingParams(max_tokens=2), "qv"), col.sink("a"))
    with pytest.raises(OverloadedError, match="max_waiting"):
        core.add_request(GenerationRequest("b", ids, SamplingParams(max_tokens=2)), col.sink("b"))
    store.deactivate("qv")
    core.step()
    assert isinstance(col.errors["a"], ModelNotFoundError)


def test_new_version_replaces_old_weights(tiny_dir: Path, store: AdapterStore, lora_other: Path,
                                          lora_all: Path) -> None:
    core = _core(tiny_dir, store)
    ids = tuple(core.tokenizer("the quick brown fox")["input_ids"])
    col = Collector()

    def run(rid: str) -> list[int]:
        core.add_request(GenerationRequest(rid, ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                                           "all"), col.sink(rid))
        while core.has_work():
            core.step()
        return col.tokens(rid)

    first = run("v1")
    store.put("all", lora_other)
    core.sync_store()
    second = run("v2")
    assert [r.version for r in core.cache.refs() if r.name == "all"] == [2]
    assert second == _reference(tiny_dir, lora_other, list(ids), 8)[0]
    assert first == _reference(tiny_dir, lora_all, list(ids), 8)[0] and first != second


def _prompt_logprob(tiny_dir: Path, adapter_dir: Path | None, ids: list[int]) -> float:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return float(lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean())


def test_prompt_perplexity_from_prefill_matches_a_full_forward(tiny_dir: Path, store: AdapterStore,
                                                               lora_all: Path) -> None:
    """Sampled prompts get the mean log-prob of their tokens (adapter applied, padding ignored); others none."""
    core = _core(tiny_dir, store, prompt_perplexity_sample=1.0)
    tok = core.tokenizer
    col = Collector()
    plan = [(None, None, PROMPTS[0]), ("all", lora_all, PROMPTS[3]), (None, None, PROMPTS[5])]
    for i, (name, _, prompt) in enumerate(plan):  # one prefill batch with different prompt lengths
        p = SamplingParams(max_tokens=2, temperature=0.0)
        core.add_request(GenerationRequest(str(i), tuple(tok(prompt)["input_ids"]), p, name), col.sink(str(i)))
    while core.has_work():
        core.step()
    for i, (_, adir, prompt) in enumerate(plan):
        ids = tok(prompt)["input_ids"]
        first = col.events[str(i)][0]
        if len(ids) < 2:
            assert first.prompt_logprob is None
            continue
        assert first.prompt_logprob == pytest.approx(_prompt_logprob(tiny_dir, adir, ids), abs=TOL)
        assert all(e.prompt_logprob is None for e in col.events[str(i)][1:])
    off = _core(tiny_dir, None, prompt_perplexity_sample=0.0)
    col = Collector()
    off.add_request(GenerationRequest("x", tuple(tok(PROMPTS[0])["input_ids"]),
                                      SamplingParams(max_tokens=1, temperature=0.0)), col.sink("x"))
    while off.has_work():
        off.step()
    assert col.events["x"][0].prompt_logprob is None


def test_a_request_torch_refuses_at_admission_fails_alone(tiny_dir: Path, store: AdapterStore) -> None:
    """A seed outside what a torch generator takes (the API refuses it; the engine must not rely on that) fails
    its own request with a 4xx error; the request admitted beside it completes and no adapter stays pinned."""
    core = _core(tiny_dir, store)
    ids = tuple(core.tokenizer("hello")["input_ids"])
    col = Collector()
    core.add_request(GenerationRequest("bad", ids, SamplingParams(max_tokens=3, seed=2**64), "all"), col.sink("bad"))
    core.add_request(GenerationRequest("ok", ids, SamplingParams(max_tokens=3, ignore_eos=True), "all"),
                     col.sink("ok"))
    while core.has_work():
        core.step()
    assert col.errors["bad"].status == 400 and "bad" not in col.events
    assert col.events["ok"][-1].finish_reason == "length"
    assert not any(core.cache.pinned(r) for r in core.cache.refs())


def test_a_failed_prefill_fails_the_requests_it_admitted(tiny_dir: Path, store: AdapterStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests taken off the queue by a step whose prefill raises are neither queued nor batched yet: the
    engine's failure path must still answer them (else their callers wait forever) and unpin their adapters."""
    core = _core(tiny_dir, store)
    ids = tuple(core.tokenizer("hello")["input_ids"])
    col = Collector()
    for rid in ("a", "b"):
        core.add_request(GenerationRequest(rid, ids, SamplingParams(max_tokens=3), "all"), col.sink(rid))

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(core, "_forward", boom)
    with pytest.raises(RuntimeError):
        core.step()
    core.fail_all(EngineError("failed"))  # what AsyncEngine does after a failed step
    assert set(col.errors) == {"a", "b"} and not core.has_work()
    assert not any(core.cache.pinned(r) for r in core.cache.refs())


@pytest.mark.parametrize("temperature", [1e-4, 1e-6, 1e-40, 1e-300])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature: float) -> None:
    # (1e-300 is 0 in float32: dividing the logits by it made the top token 0/0 = NaN, and the whole batch failed)
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, -1.0, 2.0]])
    params = [SamplingParams(max_tokens=1, temperature=temperature, seed=1)] * 2
    gens = [torch.Generator().manual_seed(1) for _ in params]
    assert [s.token_id for s in sample_rows(logits, params, gens)] == [1, 0]
    assert params[0].greedy == (temperature < 1e-5)


def test_a_failure_during_admission_fails_the_requests_already_admitted(tiny_dir: Path, store: AdapterStore,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """If making a later request's adapter resident fails (an out-of-memory, a file gone), the requests admitted
    before it in the same step are off the queue and pinned: the failure path must answer and unpin them."""
    core = _core(tiny_dir, store)
    ids = tuple(core.tokenizer("hello")["input_ids"])
    col = Collector()
    core.add_request(GenerationRequest("a", ids, SamplingParams(max_tokens=3), "all"), col.sink("a"))
    core.add_request(GenerationRequest("b", ids, SamplingParams(max_tokens=3), "qv"), col.sink("b"))
    real = core.ensure_resident

    def fails_for_qv(ref, weights=None):  # type: ignore[no-untyped-def]
        if ref.name == "qv":
            raise RuntimeError("out of memory")
        return real(ref, weights)

    monkeypatch.setattr(core, "ensure_resident", fails_for_qv)
    with pytest.raises(RuntimeError):
        core.step()
    core.fail_all(EngineError("failed"))
    assert set(col.errors) == {"a", "b"} and not core.has_work()
    assert not any(core.cache.pinned(r) for r in core.cache.refs())
