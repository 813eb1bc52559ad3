"""The robust recipe's denoising stage (tuning/denoise.py) on a tiny random llama: word alignment, training,
restore, layer choice and the strength choice with a denoiser below the task layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsugiki.config import ModelConfig
from tsugiki.tuning.config import GateConfig, RobustConfig, TuneConfig
from tsugiki.tuning.data import Example, label_prompt
from tsugiki.tuning.denoise import Denoiser, denoise_layers, lora_params, pairs, word_ends
from tsugiki.tuning.job import build_model, pick_strength, set_strength
from tsugiki.tuning.trainer import Trainer, noisy_texts

TEXTS = ["book a flight to tokyo", "set an alarm for 7 am", "what is my balance", "the capital of france",
         "hello world how are you", "the quick brown fox", "jumps over the lazy dog", "paris is the capital"]


def _cfg(tiny_dir: Path, **kw: object) -> TuneConfig:
    return TuneConfig(**{**dict(model=ModelConfig(base_model=str(tiny_dir)), num_layers=1, rank=4, alpha=8,
                                eval_batch_size=8, num_cpus=1, gate=GateConfig(families=("typos",))), **kw})


def _train() -> list[Example]:
    return [_ex(t + (" today" if i >= len(TEXTS) else ""), ["travel", "alarm"][i % 2])
            for i, t in enumerate(TEXTS * 2)]


def _ex(text: str, label: str = "travel") -> Example:
    return Example(label_prompt(text), " " + label, text, label)


def _setup(tiny_dir: Path, cfg: TuneConfig) -> tuple[object, object, list[Example]]:
    torch.manual_seed(0)
    model = build_model(cfg, AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), [0, 1])
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return model, tok, _train()


def test_word_ends_point_at_each_words_last_token_and_the_template_tail(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "book  a flight to tokyo"  # a double space is an empty word, not a word
    ids, pos = word_ends(tok, _ex(text), text)
    assert ids == tok(label_prompt(text))["input_ids"]
    offs = tok(label_prompt(text), return_offsets_mapping=True)["offset_mapping"]
    start = label_prompt(text).index(text)
    ends = [start + text.index(w) + len(w) - 1 for w in ("book", "a", "flight", "to", "tokyo")]
    assert [offs[j][0] <= e < offs[j][1] for j, e in zip(pos, ends)] == [True] * 5
    assert pos[5:] == [len(ids) - 3, len(ids) - 2, len(ids) - 1]  # "\nIntent:" comes after the text
    plain = Example("2+2 is", " 4", text="2+2 is")  # a prompt/completion record: the text is the prompt
    offs = tok("2+2 is", return_offsets_mapping=True)["offset_mapping"]
    assert [offs[j][0] <= e < offs[j][1] for j, e in zip(word_ends(tok, plain, "2+2 is")[1], (2, 5))] == [True] * 2
    assert word_ends(tok, Example("<chat>", "hi"), "x") is None  # chats have no free text


def test_only_copies_that_keep_the_words_are_paired(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = _cfg(tiny_dir, robust=RobustConfig(families=("typos", "code_switch", "truncate"), copies=3))
    train = _train()
    clean, ps = pairs(tok, train, cfg)
    assert len(clean) == 16 and ps
    fams = {(i, text) for i, ex in enumerate(train) for fam, text in noisy_texts(ex, cfg, i) if fam == "typos"
            and text != ex.text}
    assert {(p.example, tok.decode(p.noisy_ids, skip_special_tokens=True)) for p in ps} \
        <= {(i, label_prompt(t)) for i, t in fams}  # typos only: code-switching and truncation are never paired
    for p in ps:
        assert len(p.clean_pos) == len(p.noisy_pos)
        assert [clean[p.example][j] for j in p.clean_pos[-3:]] == [p.noisy_ids[j] for j in p.noisy_pos[-3:]]


def test_denoiser_pulls_noisy_states_to_the_clean_ones_and_restores(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dir, robust=RobustConfig(families=("typos", "keyboard"), copies=2, denoise_layers=1,
                                             denoise_epochs=4, denoise_lr=1e-2))
    model, tok, train = _setup(tiny_dir, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = Denoiser(cfg, model, tok, train, [0], checkpoint_dir=tmp_path / "d", progress=False).train()
    assert res.pairs > 0 and res.steps == 4 * -(-res.pairs // 48)
    assert res.loss_after < 0.7 * res.loss_before and res.clean_loss < res.loss_after
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layers.0." in n for n in changed)  # the task layer is the next stage's
    assert not any(p.requires_grad for p in lora_params(model, [0]).values())  # frozen for the next stage
    assert res.params == sum(p.numel() for p in lora_params(model, [0]).values())
    # a rerun of the same configuration loads the stage instead of training it again
    model2, _, _ = _setup(tiny_dir, cfg)
    again = Denoiser(cfg, model2, tok, train, [0], checkpoint_dir=tmp_path / "d", progress=False).train()
    assert again.resumed and again.loss_after == pytest.approx(res.loss_after, abs=1e-5)
    for n, p in lora_params(model, [0]).items():
        assert torch.equal(p, dict(model2.named_parameters())[n])
    other = cfg.model_copy(update={"learning_rate": 1e-4})  # another configuration trains its own
    model3, _, _ = _setup(tiny_dir, other)
    assert not Denoiser(other, model3, tok, train, [0], checkpoint_dir=tmp_path / "d", progress=False).train().resumed


def test_denoiser_layers_sit_below_the_task_layers() -> None:
    robust = RobustConfig(denoise_layers=6)
    assert denoise_layers(TuneConfig(robust=robust), [22, 23]) == [0, 1, 2, 3, 4, 5]
    assert denoise_layers(TuneConfig(robust=robust), [3, 9]) == [0, 1, 2]
    assert denoise_layers(TuneConfig(robust=robust), [0, 1]) == []  # all layers: nothing below
    assert denoise_layers(TuneConfig(robust=None), [22]) == []
    assert denoise_layers(TuneConfig(robust=RobustConfig(denoise_layers=0)), [22]) == []
    assert denoise_layers(TuneConfig(robust=RobustConfig(copies=0)), [22]) == []  # no noisy copies to align
    assert denoise_layers(TuneConfig(method="full", robust=robust), [22]) == []


def test_strength_choice_rescores_the_cached_states_when_a_denoiser_scales_with_it(tiny_dir: Path) -> None:
    cfg = _cfg(tiny_dir, robust=RobustConfig(families=("typos",), copies=1, denoise_layers=1,
                                             strengths=(0.5, 1.0)))
    model, tok, train = _setup(tiny_dir, cfg)
    with torch.no_grad():  # non-zero LoRA weights everywhere, so every strength gives another model
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
    _, table = pick_strength(cfg, model, tok, train, [1])
    for s in (0.5, 1.0):
        set_strength(model, s)
        fresh = Trainer(cfg, model, tok, train, layers=[1], progress=False)
        assert table[s]["clean_loss"] == pytest.approx(fresh.mean_loss(0), rel=1e-4), s


def test_data_without_alignable_copies_gets_no_denoiser(tiny_dir: Path) -> None:
    from tsugiki.serve.base_model import load_base_model
    from tsugiki.tuning.data import TuningData
    from tsugiki.tuning.job import fit

    cfg = _cfg(tiny_dir, epochs=1, robust=RobustConfig(families=("code_switch",), copies=1, denoise_layers=1))
    train = _train()
    loaded = load_base_model(cfg.model, progress=False)
    model, res = fit(cfg, loaded, TuningData(train=train, val=train[:4], data_hash="x"), progress=False)
    assert res.denoise is None and not lora_params(model, [0])  # code-switching replaces words: nothing lines up
    with pytest.raises(ValueError, match="nothing to align"):
        Denoiser(cfg, model, loaded.tokenizer, train, [0], progress=False)


def test_targets_are_the_base_models_clean_states_whatever_the_lora_holds(tiny_dir: Path) -> None:
    cfg = _cfg(tiny_dir, robust=RobustConfig(families=("typos",), copies=1, denoise_layers=1))
    model, tok, train = _setup(tiny_dir, cfg)
    d = Denoiser(cfg, model, tok, train, [0], progress=False)
    with torch.no_grad():
        for p in lora_params(model, [0]).values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        with model.disable_adapter():
            base = d._states([d.clean[0]])[0]
        tuned = d._states([d.clean[0]])[0]
    target = d._targets([0])[0]
    assert torch.allclose(target, base, atol=1e-5) and not torch.allclose(target, tuned, atol=1e-3)
