"""Tuning job on a tiny random llama: data validation, augmentation, layer choice, frozen-prefix caching,
resume from checkpoint, the gate's decisions, and the whole job writing (or refusing) an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsugiki.adapters.format import peft_loadable_copy, read_lora_artifact
from tsugiki.adapters.lexicon import Lexicon
from tsugiki.adapters.store import AdapterStore
from tsugiki.config import ModelConfig
from tsugiki.errors import AdapterError
from tsugiki.serve.base_model import load_base_model
from tsugiki.tuning.config import GateConfig, RobustConfig, TuneConfig
from tsugiki.tuning.data import (
    LABEL_TEMPLATE,
    DataError,
    Example,
    TuningData,
    label_prompt,
    load_jsonl,
    read_examples,
    split,
)
from tsugiki.tuning.gate import decide, negative_flip_rate
from tsugiki.tuning.job import (
    _served_lexicon,
    build_model,
    choose_layers,
    fit,
    pick_strength,
    run_gate,
    run_local,
    set_strength,
)
from tsugiki.tuning.trainer import (
    Encoded,
    Trainer,
    correct,
    encode,
    frozen_bfloat16,
    lr_factor,
    noisy_copies,
    noisy_texts,
    served_prompt,
    shared_head,
)

WORDS = ["book a flight to tokyo", "set an alarm for 7 am", "what is my balance", "the capital of france",
         "hello world how are you", "the quick brown fox", "jumps over the lazy dog", "paris is the capital"]
LABELS = ["travel", "alarm", "balance", "capital"]


def _records(n: int = 32) -> list[dict[str, str]]:
    return [{"text": WORDS[i % len(WORDS)] + (" today" if i >= len(WORDS) else ""),
             "label": LABELS[i % len(LABELS)]} for i in range(n)]


def _write(path: Path, recs: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(tiny_dir: Path, **kw: object) -> TuneConfig:
    base = dict(model=ModelConfig(base_model=str(tiny_dir)), num_layers=1, rank=4, alpha=8, epochs=2,
                batch_size=4, learning_rate=5e-3, checkpoint_every=3, eval_batch_size=8, num_cpus=1,
                robust=RobustConfig(families=("typos", "keyboard"), copies=1, strengths=(0.5, 1.0)),
                gate=GateConfig(families=("typos",), max_family_drop=1.0, min_retained_agreement=0.0,
                                min_gain_over_base=-1.0))
    base.update(kw)
    return TuneConfig(**base)


# ---------------------------------------------------------------------------------------------- data
def test_three_record_shapes_and_deterministic_split(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    recs = [*_records(20), {"prompt": "2+2=", "completion": " 4"}, chat]
    data = load_jsonl(_write(tmp_path / "d.jsonl", recs), val_share=0.3,
                      chat_template=lambda m: f"<u>{m[-1]['content']}</u>")
    assert data.labels == sorted(LABELS)
    everything = data.train + data.val
    assert Example(label_prompt(WORDS[0]), " travel", text=WORDS[0], label="travel") in everything
    assert any(e.prompt == "<u>hi there</u>" and e.completion == "hello" and e.text is None for e in everything)
    # the split depends on content only: shuffled lines give the same sides and the same train set
    again = load_jsonl(_write(tmp_path / "r.jsonl", recs[::-1]), val_share=0.3,
                       chat_template=lambda m: f"<u>{m[-1]['content']}</u>")
    assert set(again.val) == set(data.val) and set(again.train) == set(data.train)
    assert 0 < len(data.val) < len(everything)
    assert data.data_hash == load_jsonl(tmp_path / "d.jsonl", val_share=0.3,
                                        chat_template=lambda m: f"<u>{m[-1]['content']}</u>").data_hash
    assert data.data_hash != load_jsonl(tmp_path / "d.jsonl", val_share=0.3,
                                        chat_template=lambda m: "x" + m[-1]["content"]).data_hash
    train, val = split(everything, 0.0)
    assert not val and len(train) == len(everything)


@pytest.mark.parametrize("line, match", [
    ('{"text": "hi"}', r"d.jsonl:2: field 'label' must be a string"),
    ('{"prompt": "a", "completion": 3}', r"d.jsonl:2: field 'completion' must be a string"),
    ('{"prompt": "", "completion": "x"}', r"d.jsonl:2: field 'prompt' is empty"),
    ('{"text": "a", "label": "x\\ny"}', r"d.jsonl:2: field 'label' must be one line"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     r"d.jsonl:2: field 'messages' must end with the assistant"),
    ('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     r"d.jsonl:2: field 'messages\[0\]'"),
    ('{"question": "a"}', r"d.jsonl:2: a record needs 'prompt'\+'completion'"),
    ('[1, 2]', r"d.jsonl:2: expected a JSON object"),
    ('{"text": "a", "label": "b"', r"d.jsonl:2: invalid JSON"),
])
def test_bad_records_name_the_line_and_field(tmp_path: Path, line: str, match: str) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        read_examples(f, chat_template=lambda m: "x")


def test_missing_empty_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_examples(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:1: not UTF-8"):
        read_examples(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="no validation examples"):
        load_jsonl(_write(tmp_path / "one.jsonl", _records(1)), val_share=0.01)


# ---------------------------------------------------------------------------------------------- augmentation
def test_noisy_copies_are_deterministic_and_keep_the_template(tiny_dir: Path) -> None:
    cfg = _cfg(tiny_dir, robust=RobustConfig(families=("typos", "ocr"), copies=2, severity=0.5))
    ex = Example(label_prompt("book a flight to tokyo today"), " travel", text="book a flight to tokyo today",
                 label="travel")
    a, b = noisy_copies(ex, cfg, 3), noisy_copies(ex, cfg, 3)
    assert a == b and len(a) == 2 and all(p.startswith("Classify the intent") for p in a)
    assert all(p != ex.prompt for p in a)
    assert noisy_copies(ex, cfg.model_copy(update={"seed": 1}), 3) != a
    chat = Example("<|im_start|>user\nhi<|im_end|>", "hello")
    assert noisy_copies(chat, cfg, 0) == []  # chats have no free text to corrupt safely
    assert noisy_copies(ex, cfg.model_copy(update={"robust": None}), 0) == []
    # behind a lexicon of the task's words (what the strength choice scores): the copies as the gateway corrects
    # them, and the clean prompt as it is
    lex = Lexicon.build(["book a flight to tokyo today"])
    fixed = noisy_copies(ex, cfg, 3, lex)
    assert fixed == [label_prompt(lex.correct(text)) for _, text in noisy_texts(ex, cfg, 3)]
    assert fixed != a and sum(p == ex.prompt for p in fixed) >= 1  # at least one copy fully restored
    assert served_prompt(ex, lex) == ex.prompt and served_prompt(chat, lex) == chat.prompt


# ---------------------------------------------------------------------------------------------- layers
def test_layer_choice(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    train = [Example(label_prompt(r["text"]), " " + r["label"], r["text"], r["label"]) for r in _records(8)]
    assert choose_layers(_cfg(tiny_dir), model, tok, train) == ([1], {})
    assert choose_layers(_cfg(tiny_dir, layers="all"), model, tok, train)[0] == [0, 1]
    assert choose_layers(_cfg(tiny_dir, layers=(0,)), model, tok, train)[0] == [0]
    with pytest.raises(ValueError, match="not in 0..1"):
        choose_layers(_cfg(tiny_dir, layers=(5,)), model, tok, train)
    chosen, scores = choose_layers(_cfg(tiny_dir, layers="probe"), model, tok, train)
    assert len(chosen) == 1 and set(scores) == {0, 1} and all(v > 0 for v in scores.values())
    assert chosen == [max(scores, key=lambda i: scores[i])]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


# ---------------------------------------------------------------------------------------------- the loop
def _examples() -> list[Example]:
    return [Example(label_prompt(r["text"]), " " + r["label"], r["text"], r["label"]) for r in _records(16)]


def _trainer(tiny_dir: Path, cfg: TuneConfig, ckpt: Path | None = None,
             dtype: torch.dtype = torch.float32, lexicon: Lexicon | None = None) -> Trainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    train = _examples()
    layers, _ = choose_layers(cfg, model, tok, train)
    return Trainer(cfg, build_model(cfg, model, layers), tok, train, layers=layers, checkpoint_dir=ckpt,
                   progress=False, lexicon=lexicon)


def _same_lora_weights(*trainers: Trainer) -> None:
    """B is zero at init: give every trainer the same non-zero LoRA weights."""
    with torch.no_grad():
        for named in zip(*(t.params.items() for t in trainers)):
            (n, p), rest = named[0], named[1:]
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
            for _, q in rest:
                q.copy_(p)


def test_frozen_prefix_cache_gives_the_same_loss_and_gradients(tiny_dir: Path) -> None:
    cached = _trainer(tiny_dir, _cfg(tiny_dir, cache_frozen=True, frozen_dtype="float32"))
    plain = _trainer(tiny_dir, _cfg(tiny_dir, cache_frozen=False))
    plain.head_ids = ()  # every input through every layer on its own: the reference
    assert cached.start == 1 and plain.start == 0
    # the template's head is computed once per batch and shared: its tokens are the same in every input
    head = cached.tok.decode(list(cached.head_ids))
    assert head and LABEL_TEMPLATE.startswith(head.strip())
    _same_lora_weights(cached, plain)
    la, lb = cached.loss([0, 1, 2, 5], 0), plain.loss([0, 1, 2, 5], 0)
    la.backward()
    lb.backward()
    assert float(la) == pytest.approx(float(lb), abs=1e-5)
    for (n, p), (_, q) in zip(cached.params.items(), plain.params.items()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n
        assert ".layers.1." in n  # only the chosen upper layer is trainable


def test_packed_rows_give_the_logits_of_each_input_alone(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tsugiki.tuning.trainer as trainer

    for cache in (False, True):  # embedded here or cached below the trained layer
        t = _trainer(tiny_dir, _cfg(tiny_dir, frozen_dtype="float32", cache_frozen=cache))
        _same_lora_weights(t)
        keys = [(i, v) for i in (0, 3, 4, 5, 9) for v in (0, 1)]  # clean and noisy inputs of different lengths
        lengths = [len(t._enc(k).ids) - len(t.head_ids) for k in keys]
        assert len(set(lengths)) > 2
        results = []
        with torch.no_grad():
            alone = [t._logits([k]) for k in keys]
            for capacity in (1, max(lengths) + 3, sum(lengths)):  # a row each, several per row, all in one
                monkeypatch.setattr(trainer, "PACK_TOKENS", capacity)
                results.append(t._logits(keys))
        assert [len(trainer.pack(lengths, c)) for c in (1, sum(lengths))] == [len(keys), 1]
        assert 1 < len(trainer.pack(lengths, max(lengths) + 3)) < len(keys)
        for packed, target in results:
            assert torch.equal(target, torch.cat([a[1] for a in alone]))
            assert torch.allclose(packed, torch.cat([a[0] for a in alone]), atol=1e-5)


def test_pack_fills_rows_up_to_capacity() -> None:
    from tsugiki.tuning.trainer import pack

    lengths = [5, 9, 3, 12, 7, 2]
    rows = pack(lengths, 12)
    assert sorted(j for r in rows for j in r) == list(range(len(lengths)))  # every input once
    assert all(sum(lengths[j] for j in r) <= 12 for r in rows)
    assert len(rows) == 4  # 38 tokens need at least 4 rows of 12
    assert pack([20, 3], 8) == [[0], [1]]  # longer than a row: a row of its own


def test_robust_loss_is_clean_plus_noisy_cross_entropy_plus_consistency(tiny_dir: Path) -> None:
    t = _trainer(tiny_dir, _cfg(tiny_dir, frozen_dtype="float32"))
    _same_lora_weights(t)
    batch = [0, 1, 2, 5]
    with torch.no_grad():
        got = float(t.loss(batch, 1))
        c_logits, c_target = t._logits([(i, 0) for i in batch])
        n_logits, n_target = t._logits([(i, 1) for i in batch])  # one copy each: epoch 1 uses copy 1 too
    assert all(len(t.noisy[i]) == 1 for i in batch) and torch.equal(c_target, n_target)
    F = torch.nn.functional
    kl = F.kl_div(n_logits.log_softmax(-1), c_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    assert t.cfg.robust is not None
    w = t.cfg.robust.consistency_weight
    want = F.cross_entropy(c_logits, c_target) + F.cross_entropy(n_logits, n_target) + w * kl
    assert got == pytest.approx(float(want), abs=1e-5) and float(kl) > 0


def test_worst_of_trains_each_example_on_its_highest_loss_copy(tiny_dir: Path) -> None:
    rc = RobustConfig(families=("typos", "keyboard", "ocr"), copies=3, worst_of=True)
    t = _trainer(tiny_dir, _cfg(tiny_dir, frozen_dtype="float32", robust=rc))
    _same_lora_weights(t)
    batch = [0, 1, 2, 5]
    F = torch.nn.functional
    with torch.no_grad():
        per_copy = {(i, v): float(F.cross_entropy(*t._logits([(i, v)]), reduction="sum"))
                    for i in batch for v in (1, 2, 3)}
        worst = {i: max((1, 2, 3), key=lambda v, i=i: per_copy[(i, v)]) for i in batch}
        assert t.worst_variants(batch) == worst
        assert len({per_copy[(i, v)] for i in batch for v in (1, 2, 3)}) > len(batch)  # the copies differ
        assert any(worst[i] != t.noisy_variant(i, 0) for i in batch)  # not the copy cycling would pick
        got = float(t.loss(batch, 0))
        c_logits, c_target = t._logits([(i, 0) for i in batch])
        n_logits, n_target = t._logits([(i, worst[i]) for i in batch])
    kl = F.kl_div(n_logits.log_softmax(-1), c_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    want = F.cross_entropy(c_logits, c_target) + F.cross_entropy(n_logits, n_target) + rc.consistency_weight * kl
    assert got == pytest.approx(float(want), abs=1e-5)
    fresh = _trainer(tiny_dir, _cfg(tiny_dir, epochs=2, robust=rc))
    fresh.train(stop_after=1)
    assert {v for _, v in fresh._cache} == {0, 1, 2, 3}  # every copy is a candidate in every epoch


def test_corrected_copies_train_on_what_the_gateway_serves_and_skip_restored_copies(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc = RobustConfig(families=("typos", "keyboard", "ocr"), copies=3, corrected_copies=True)
    cfg = _cfg(tiny_dir, frozen_dtype="float32", robust=rc)
    train = _examples()
    lex = Lexicon.build([e.text for e in train if e.text is not None])
    t = _trainer(tiny_dir, cfg, lexicon=lex)
    tok = t.tok
    assert [e.ids for e in t.clean] == [encode(tok, served_prompt(e, lex), e.completion, cfg.max_length).ids
                                        for e in train]
    assert [[e.ids for e in es] for es in t.noisy] == [
        [encode(tok, p, e.completion, cfg.max_length).ids for p in noisy_copies(e, cfg, i, lex)]
        for i, e in enumerate(train)]
    restored = {(i, v) for i in range(len(train)) for v in (1, 2, 3) if t.same_as_clean(i, v)}
    assert 0 < len(restored) < 3 * len(train)  # the lexicon undoes some copies, not all
    _same_lora_weights(t)
    F = torch.nn.functional
    for epoch in range(3):
        batch = list(range(len(train)))
        noisy = [i for i in batch if (i, t.noisy_variant(i, epoch)) not in restored]
        with torch.no_grad():
            got = float(t.loss(batch, epoch))
            c_logits, c_target = t._logits([(i, 0) for i in batch])
            n_logits, n_target = t._logits([(i, t.noisy_variant(i, epoch)) for i in noisy])
        sel = torch.cat([torch.full((len(t.clean[i].ids) - t.clean[i].n_prompt,), i in noisy) for i in batch])
        kl = F.kl_div(n_logits.log_softmax(-1), c_logits[sel].log_softmax(-1), log_target=True,
                      reduction="batchmean")
        want = F.cross_entropy(c_logits, c_target) + F.cross_entropy(n_logits, n_target) + kl
        assert got == pytest.approx(float(want), abs=1e-5)  # a restored copy adds no second clean pass
    fresh = _trainer(tiny_dir, cfg.model_copy(update={"epochs": 3}), lexicon=lex)
    fresh.train(stop_after=1)
    # the frozen pass covers the copies the epochs use, except the restored ones
    assert set(fresh._cache) == {(i, v) for i in range(len(train)) for v in (0, 1, 2, 3)} - restored
    # fit() trains through the lexicon it is given, or builds the adapter's own
    seen: list[Lexicon | None] = []

    class Spy(Trainer):
        def __init__(self, *a: Any, lexicon: Lexicon | None = None, **kw: Any) -> None:
            seen.append(lexicon)
            super().__init__(*a, lexicon=lexicon, **kw)

    monkeypatch.setattr("tsugiki.tuning.job.Trainer", Spy)
    data = TuningData(train=train, val=train[:4], data_hash="x")
    one = cfg.model_copy(update={"epochs": 1})
    plain = one.model_copy(update={"robust": rc.model_copy(update={"corrected_copies": False})})
    for c, given in ((one, lex), (one, None), (plain, lex)):  # a fresh base model each (fit wraps it in LoRA)
        fit(c, load_base_model(cfg.model, progress=False), data, progress=False, lexicon=given)
    assert seen[0] is lex and seen[1] is not None and seen[1].counts == lex.counts and seen[2] is None
    with pytest.raises(ValueError, match="set lexicon to true"):
        RobustConfig(corrected_copies=True, lexicon=False)
    # the lexicon shapes the training inputs now, so it is part of what determines the weights
    assert cfg.model_copy(update={"robust": rc.model_copy(update={"lexicon": False})}).fingerprint() != \
        cfg.fingerprint()


def test_the_frozen_pass_covers_the_noisy_copies_the_epochs_use(tiny_dir: Path) -> None:
    rc = RobustConfig(families=("typos", "keyboard", "ocr"), copies=3, worst_of=False)
    t = _trainer(tiny_dir, _cfg(tiny_dir, epochs=2, robust=rc))
    assert all(len(t.noisy[i]) == 3 for i in range(len(t.clean)))
    t.train(stop_after=1)
    # epoch e trains on copy e mod 3: with 2 epochs copy 3 is never used, so it never goes through the layers
    assert {v for _, v in t._cache} == {0, 1, 2}
    t3 = _trainer(tiny_dir, _cfg(tiny_dir, epochs=4, robust=rc))
    t3.train(stop_after=1)
    assert {v for _, v in t3._cache} == {0, 1, 2, 3}


def test_a_resumed_run_skips_the_copies_of_finished_epochs(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dir, epochs=2, robust=RobustConfig(families=("typos", "keyboard", "ocr"), copies=3,
                                                       worst_of=False))
    first = _trainer(tiny_dir, cfg, ckpt=tmp_path / "ckpt")
    per_epoch = len(first.order(0))
    first.train(stop_after=per_epoch + cfg.checkpoint_every - per_epoch % cfg.checkpoint_every)
    resumed = _trainer(tiny_dir, cfg, ckpt=tmp_path / "ckpt")
    res = resumed.train(stop_after=1)
    assert res.resumed_from > per_epoch  # in epoch 1, which trains on copy 2 only
    assert {v for _, v in resumed._cache} == {0, 2}


def test_full_fine_tuning_with_the_shared_head_gives_the_same_gradients(tiny_dir: Path) -> None:
    shared = _trainer(tiny_dir, _cfg(tiny_dir, method="full"))
    plain = _trainer(tiny_dir, _cfg(tiny_dir, method="full"))
    plain.head_ids = ()
    assert shared.head_ids and shared.start == 0
    la, lb = shared.loss([0, 3, 4, 7], 1), plain.loss([0, 3, 4, 7], 1)
    la.backward()
    lb.backward()
    assert float(la) == pytest.approx(float(lb), abs=1e-5)
    for (n, p), (_, q) in zip(shared.params.items(), plain.params.items()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-5), n  # the embeddings too


def test_bfloat16_frozen_pass_stays_close_and_training_stays_float32(tiny_dir: Path) -> None:
    fast = _trainer(tiny_dir, _cfg(tiny_dir, frozen_dtype="bfloat16"))
    exact = _trainer(tiny_dir, _cfg(tiny_dir, frozen_dtype="float32"))
    assert fast.frozen_bf16 and not exact.frozen_bf16
    _same_lora_weights(fast, exact)
    la, lb = fast.loss([0, 1, 2, 5], 0), exact.loss([0, 1, 2, 5], 0)
    assert la.dtype == torch.float32 and all(h.dtype == torch.float32 for h in fast._cache.values())
    assert float(la) == pytest.approx(float(lb), rel=2e-2)  # bfloat16 keeps ~3 significant digits
    assert float(la) != float(lb)  # it really ran in bfloat16


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_a_bfloat16_model_trains_in_its_own_dtype(tiny_dir: Path, frozen_dtype: str) -> None:
    t = _trainer(tiny_dir, _cfg(tiny_dir, frozen_dtype=frozen_dtype), dtype=torch.bfloat16)  # as on a GPU
    assert t.start == 1 and t.dtype == torch.bfloat16
    res = t.train(stop_after=2)
    assert res.steps == 2 and all(np.isfinite(res.losses))
    assert all(h.dtype == torch.bfloat16 for h in t._cache.values())


def test_shared_head_and_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = lambda *ids: Encoded(tuple(ids), len(ids) - 1)  # noqa: E731  (the last token is the completion)
    assert shared_head([enc(1, 2, 3, 4, 9), enc(1, 2, 5, 9), enc(1, 2, 3, 9)]) == (1, 2)
    assert shared_head([enc(1, 2, 3, 9), enc(1, 2, 3, 8)]) == (1, 2)  # the last prompt token stays each one's
    assert shared_head([enc(1, 2), enc(3, 2)]) == () and shared_head([]) == ()
    cpu = torch.device("cpu")
    assert frozen_bfloat16("bfloat16", cpu) and not frozen_bfloat16("float32", cpu)
    for cpuinfo, native in [("flags : fpu avx512f amx_bf16 amx_tile", True), ("flags : avx512f avx512_bf16", True),
                            ("flags : fpu avx2 avx512f", False), (OSError("no /proc"), False)]:
        def read(self: Path, *a: object, cpuinfo: object = cpuinfo, **k: object) -> str:
            if isinstance(cpuinfo, OSError):
                raise cpuinfo
            return str(cpuinfo)

        monkeypatch.setattr(Path, "read_text", read)
        assert frozen_bfloat16("auto", cpu) is native, cpuinfo


def test_training_lowers_the_loss_and_full_method_trains_everything(tiny_dir: Path) -> None:
    t = _trainer(tiny_dir, _cfg(tiny_dir, epochs=6))
    res = t.train()
    assert res.steps == 6 * 4 and np.mean(res.losses[-4:]) < 0.7 * np.mean(res.losses[:4])
    full = _trainer(tiny_dir, _cfg(tiny_dir, method="full", epochs=1))
    assert full.start == 0 and full.layers == [0, 1]
    assert sum(p.numel() for p in full.params.values()) == sum(p.numel() for p in full.model.parameters())
    assert full.train().trainable_params > 20 * res.trainable_params


def test_linear_schedule_warms_up_then_decays_to_zero(tiny_dir: Path) -> None:
    cfg = _cfg(tiny_dir, lr_schedule="linear", warmup_ratio=0.1)
    f = [lr_factor(cfg, s, 100) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and f[9] == 1.0
    assert f[10] == 1.0 and all(a > b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(1 / 90)
    assert {lr_factor(_cfg(tiny_dir, lr_schedule="constant"), s, 100) for s in range(100)} == {1.0}
    t = _trainer(tiny_dir, cfg)  # 8 steps: 1 of warm-up, the last at 1/7 of the rate
    t.train()
    assert t.opt.param_groups[0]["lr"] == pytest.approx(cfg.learning_rate / 7)


def test_loraplus_gives_b_its_own_rate_and_the_schedule_scales_both(tiny_dir: Path) -> None:
    cfg = _cfg(tiny_dir, lr_schedule="linear", warmup_ratio=0.1, loraplus_ratio=4.0)
    t = _trainer(tiny_dir, cfg)
    rate = {id(p): g["lr"] for g in t.opt.param_groups for p in g["params"]}
    assert {n.split(".")[-3] for n in t.params} == {"lora_A", "lora_B"}
    assert {rate[id(p)] for n, p in t.params.items()} == {cfg.learning_rate, 4 * cfg.learning_rate}
    assert all(rate[id(p)] == (4 if "lora_B" in n else 1) * cfg.learning_rate for n, p in t.params.items())
    t.train()  # 8 steps: the last at 1/7 of each group's rate
    assert {round(rate[id(p)] / 7, 12) for p in t.params.values()} == \
        {round(g["lr"], 12) for g in t.opt.param_groups if g["params"]}
    assert cfg.fingerprint() != cfg.model_copy(update={"loraplus_ratio": 1.0}).fingerprint()
    assert len(_trainer(tiny_dir, cfg.model_copy(update={"loraplus_ratio": 1.0})).opt.param_groups) == 1
    with pytest.raises(ValueError):
        TuneConfig(loraplus_ratio=0.5)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_killed_run_resumes_to_the_same_weights(tiny_dir: Path, tmp_path: Path, schedule: str) -> None:
    cfg = _cfg(tiny_dir, epochs=2, lr_schedule=schedule)  # 8 steps, checkpoints every 3
    whole = _trainer(tiny_dir, cfg, tmp_path / "a")
    whole.train()
    first = _trainer(tiny_dir, cfg, tmp_path / "b")
    first.train(stop_after=5)  # "killed" after step 5: the last checkpoint is step 3
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    second = _trainer(tiny_dir, cfg, tmp_path / "b")
    res = second.train()
    assert res.resumed_from == 3 and res.steps == 8
    for n, p in whole.params.items():
        assert torch.allclose(p, second.params[n], atol=1e-6), n
    other = _trainer(tiny_dir, cfg.model_copy(update={"learning_rate": 1e-4}), tmp_path / "b")
    assert other.train(stop_after=1).resumed_from == 0  # another configuration never resumes this one


def test_strength_choice_passes_over_strengths_the_retention_check_would_reject(tiny_dir: Path) -> None:
    """WiSE-FT's interpolation is the knob for retained behaviour: a strength below the gate's retained-agreement
    threshold is not chosen while another meets it, even where the validation loss prefers it."""
    t = _trainer(tiny_dir, _cfg(tiny_dir, epochs=6, learning_rate=2e-2,
                                robust=RobustConfig(copies=0, strengths=(0.05, 1.0))))
    t.train()
    tok = t.tok
    val = [Example(label_prompt(r["text"]), " " + r["label"], r["text"], r["label"]) for r in _records(16)]
    retain = ["the weather today is sunny and warm", "please tell me a story about a dragon", "how do magnets work"]

    def pick(threshold: float, texts: list[str] = retain) -> tuple[float, dict]:
        cfg = _cfg(tiny_dir, robust=RobustConfig(copies=0, strengths=(0.05, 1.0)),
                   gate=GateConfig(families=("typos",), min_retained_agreement=threshold))
        return pick_strength(cfg, t.model, tok, val, t.layers, retain_texts=texts)

    best, table = pick(1e-9)
    r_weak, r_full = table[0.05]["retained"], table[1.0]["retained"]
    assert best == 1.0 and table[1.0]["score"] < table[0.05]["score"]  # the loss prefers the tuned adapter
    assert r_weak > r_full  # ... which moved further from the base model
    assert pick((r_weak + r_full) / 2)[0] == 0.05
    # what the job hands the gate instead of measuring again is what the gate measures at that strength
    gate_cfg = _cfg(tiny_dir, gate=GateConfig(families=("typos",), min_retained_agreement=0.0))
    report = run_gate(gate_cfg, t.model, tok, val, strength=0.05, incumbent_dir=None, retain_texts=retain)
    assert report.retained_agreement == pytest.approx(r_weak)
    assert pick(1.0)[0] == 1.0 and r_weak < 1.0  # none passes: the best by loss (the gate then says why)
    assert pick((r_weak + r_full) / 2, texts=[])[0] == 1.0 and "retained" not in pick(0.5, texts=[])[1][1.0]


@pytest.mark.timeout(120)
def test_the_gate_gives_peft_the_incumbent_only_as_a_checked_copy(tiny_dir: Path, tmp_path: Path) -> None:
    """PEFT's loader would unpickle a .bin-only incumbent and match its pattern keys with `re`, where "(.*.*)*x"
    backtracks for minutes on every module name: the gate refuses the one and loads the other in no time."""
    t = _trainer(tiny_dir, _cfg(tiny_dir))
    t.train(stop_after=2)
    inc = tmp_path / "inc"
    t.model.save_pretrained(inc)
    cfg_file = inc / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "rank_pattern": {"(.*.*)*x": 99}}))
    # the copy PEFT gets is the same adapter: every module's weights and scaling as the candidate's own
    t.model.load_adapter(str(peft_loadable_copy(inc, tmp_path / "copy")), adapter_name="check")
    adapted = [m for m in t.model.modules() if isinstance(getattr(m, "scaling", None), dict) and "check" in m.scaling]
    assert adapted
    for m in adapted:
        assert m.scaling["check"] == pytest.approx(m.scaling["default"])
        assert torch.equal(m.lora_A["check"].weight, m.lora_A["default"].weight)
        assert torch.equal(m.lora_B["check"].weight, m.lora_B["default"].weight)
    t.model.delete_adapter("check")
    val = [Example(label_prompt(r["text"]), " " + r["label"], r["text"], r["label"]) for r in _records(8)]
    report = run_gate(_cfg(tiny_dir), t.model, t.tok, val, strength=1.0, incumbent_dir=inc, retain_texts=[])
    assert report.negative_flip_rate == 0.0  # the candidate against itself
    assert "incumbent" not in t.model.peft_config
    (inc / "adapter_model.safetensors").rename(inc / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        run_gate(_cfg(tiny_dir), t.model, t.tok, val, strength=1.0, incumbent_dir=inc, retain_texts=[])


def test_strength_zero_is_the_base_model(tiny_dir: Path) -> None:
    t = _trainer(tiny_dir, _cfg(tiny_dir))
    t.train(stop_after=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        tuned = t.model(input_ids=ids).logits
        set_strength(t.model, 0.0)
        zero = t.model(input_ids=ids).logits
        with t.model.disable_adapter():
            base = t.model(input_ids=ids).logits
    assert torch.allclose(zero, base, atol=1e-6) and not torch.allclose(tuned, base, atol=1e-4)


# ---------------------------------------------------------------------------------------------- gate
def test_an_answer_is_correct_when_its_first_lines_are_the_completion() -> None:
    ex = [Example("p", " travel"), Example("p", " travel"), Example("p", "line one\nline two"),
          Example("p", "line one\nline two"), Example("p", " travel")]
    outs = [" travel\nand more", "travelling", " line one \n line two\nextra", "line one\nline 2", ""]
    assert correct(outs, ex).tolist() == [True, False, True, False, False]


def test_gate_decisions_name_each_failure() -> None:
    cfg = GateConfig(min_clean_accuracy=0.5, max_family_drop=0.2, max_negative_flip_rate=0.1,
                     min_retained_agreement=0.8)
    clean = np.array([1, 1, 1, 1, 0], bool)
    ok = decide(cfg, clean=clean, families={"typos": np.array([1, 1, 1, 0, 0], bool)},
                incumbent=np.array([1, 1, 0, 0, 0], bool), retained=0.9)
    assert ok.passed and ok.negative_flip_rate == 0.0 and ok.family_accuracy == {"typos": 0.6}
    bad = decide(cfg, clean=clean, families={"typos": np.zeros(5, bool)},
                 incumbent=np.array([0, 0, 0, 0, 1], bool), retained=0.5)
    assert not bad.passed and len(bad.failures) == 3
    assert any("typos drops 0.800" in f for f in bad.failures)
    assert any("negative flip rate 0.200" in f for f in bad.failures)
    assert any("retained agreement" in f for f in bad.failures)
    assert not decide(cfg, clean=np.zeros(4, bool), families={}, incumbent=None, retained=None).passed
    no_gain = decide(GateConfig(min_gain_over_base=0.3), clean=clean, families={}, incumbent=None, retained=None,
                     base=np.array([1, 1, 1, 0, 0], bool))
    assert no_gain.base_accuracy == 0.6 and any("does not beat the base model's 0.600" in f
                                                  for f in no_gain.failures)
    assert negative_flip_rate(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool)) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- the job
def test_job_writes_a_servable_adapter_with_a_card_or_keeps_a_failing_one_aside(tiny_dir: Path,
                                                                                 tmp_path: Path) -> None:
    data = _write(tmp_path / "train.jsonl", _records(40))
    store_dir, work = tmp_path / "store", tmp_path / "work"
    robust = RobustConfig(families=("typos", "keyboard"), copies=1, strengths=(0.5, 1.0), denoise_layers=4)
    res = run_local(_cfg(tiny_dir, robust=robust), data, "intent", store_dir=store_dir, work_dir=work,
                    progress=False)
    assert res.status == "written" and res.adapter is not None and res.adapter == "intent@v1"
    stored = Path(res.path)
    card = json.loads((stored / "model_card.json").read_text())
    assert card["base_model_fingerprint"] == load_base_model(ModelConfig(base_model=str(tiny_dir)),
                                                             progress=False).info.fingerprint
    assert card["data"]["data_hash"] and card["gate"]["passed"] and card["layers"] == [1]
    assert set(card["gate"]) >= {"clean_accuracy", "family_accuracy", "negative_flip_rate", "retained_agreement"}
    # the denoiser (tuning/denoise.py) took what lies below the task layer: layer 0 of 2
    den = card["denoise"]
    assert den["layers"] == [0] and den["pairs"] > 0 and den["loss_after"] < den["loss_before"]
    weights = read_lora_artifact(stored)  # the gateway's own reader accepts it
    assert weights.max_rank == 4 and {m.split(".")[2] for m in weights.modules} == {"0", "1"}
    assert card["strength"] in (0.5, 1.0)
    # 16 distinct prompts are too few to calibrate a drift detector on: no reference ships, the card says why
    ref = card["drift_reference"]
    assert ref["prompts"] == 0 and "16 distinct prompts, 50 needed" in ref["why"]
    assert not (stored / "drift_reference.safetensors").exists()
    # the word recognition in front of it: the training texts' words, which the gateway restores when misspelled
    lexicon = Lexicon.load(stored)
    assert lexicon is not None and card["lexicon"]["words"] == len(lexicon.counts) > 0
    word = max(lexicon.counts, key=len)
    assert lexicon.correct(word[1:] + " x") == word + " x"
    # a second version is gated against the first (negative flips) and a failing candidate is kept aside
    strict = _cfg(tiny_dir, seed=1, gate=GateConfig(families=("typos",), min_clean_accuracy=1.0,
                                                    min_retained_agreement=0.0, max_family_drop=1.0,
                                                    min_gain_over_base=-1.0))
    res2 = run_local(strict, data, "intent", store_dir=store_dir, work_dir=work, progress=False)
    if res2.status == "rejected":
        assert Path(res2.path).is_dir() and (Path(res2.path) / "model_card.json").is_file()
        assert AdapterStore(store_dir).require("intent").version == 1
        assert any("clean accuracy" in f for f in res2.gate["failures"])
    else:  # a perfect candidate is the only way through min_clean_accuracy=1.0
        assert res2.gate["clean_accuracy"] == 1.0
    assert res2.gate["negative_flip_rate"] is not None
    # the incumbent is measured behind its own lexicon; one that cannot be read is measured without, as served
    assert _served_lexicon(stored) is not None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "lexicon.json").write_text("[]")
    assert _served_lexicon(broken) is None and _served_lexicon(tmp_path / "none") is None


def test_settings_are_checked_up_front_and_the_fingerprint_ignores_what_does_not_train(tiny_dir: Path,
                                                                                        tmp_path: Path,
                                                                                        capsys) -> None:
    from pydantic import ValidationError

    from tsugiki.cli import main

    with pytest.raises(ValidationError, match="unknown corruption families"):
        RobustConfig(families=("typoz",))
    with pytest.raises(ValidationError, match="unknown corruption families"):
        GateConfig(families=("nope",))
    with pytest.raises(ValidationError, match="strengths must be above 0"):
        RobustConfig(strengths=(0.0, 1.0))
    cfg = _cfg(tiny_dir)
    looser = cfg.model_copy(update={"gate": GateConfig(max_family_drop=0.9), "num_cpus": 2,
                                    "robust": cfg.robust.model_copy(update={"strengths": (1.0,)})})
    assert looser.fingerprint() == cfg.fingerprint()  # a rejected run rerun with a looser gate resumes
    assert cfg.model_copy(update={"robust": cfg.robust.model_copy(update={"lexicon": False})}).fingerprint() == \
        cfg.fingerprint()  # the lexicon is built after training; the weights are the same
    assert cfg.model_copy(update={"learning_rate": 1e-4}).fingerprint() != cfg.fingerprint()
    data = _write(tmp_path / "d.jsonl", _records(8))
    assert main(["tune", "--data", str(data), "--name", "x", "--layers", "1,x", "--local"]) == 2
    assert "--layers '1,x'" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    assert main(["tune", "--data", str(data), "--name", "x", "--config", str(tmp_path / "bad.yaml"), "--local"]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    assert main(["tune", "--data", str(tmp_path / "missing.jsonl"), "--name", "x", "--local",
                 "--base-model", str(tiny_dir)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_chat_template_refusal_names_the_line(tmp_path: Path) -> None:
    def strict(msgs: list[dict[str, str]]) -> str:
        raise ValueError("Conversation roles must alternate user/assistant")

    f = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'messages': the chat template refused it"):
        read_examples(f, chat_template=strict)
