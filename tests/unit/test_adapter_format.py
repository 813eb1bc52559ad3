import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsugiki.adapters.format import check_fits, content_digest, read_lora_artifact
from tsugiki.errors import AdapterError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shapes(layers: int = 2) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        out.update({f"{p}.self_attn.q_proj": (64, 64), f"{p}.self_attn.k_proj": (64, 32),
                    f"{p}.self_attn.v_proj": (64, 32), f"{p}.self_attn.o_proj": (64, 64),
                    f"{p}.mlp.gate_proj": (64, 128), f"{p}.mlp.up_proj": (64, 128), f"{p}.mlp.down_proj": (128, 64)})
    return out


def test_reads_peft_artifact_with_scaling(lora_all: Path, lora_qv: Path) -> None:
    w = read_lora_artifact(lora_all)
    assert len(w.modules) == 14 and w.max_rank == 8
    a, b = w.modules["model.layers.0.self_attn.q_proj"]
    assert a.shape == (8, 64) and b.shape == (64, 8)
    assert w.scaling["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 8)
    qv = read_lora_artifact(lora_qv)
    assert set(qv.modules) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert qv.scaling["model.layers.1.self_attn.v_proj"] == pytest.approx(1.0)
    check_fits(w, _shapes(), max_rank=64, base_name="tiny", where="'a'")


def test_rslora_scaling(lora_all: Path, tmp_path: Path) -> None:
    d = _copy(lora_all, tmp_path / "rs")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    w = read_lora_artifact(d)
    assert w.scaling["model.layers.0.mlp.up_proj"] == pytest.approx(16 / math.sqrt(8))


def test_digest_changes_with_content(lora_all: Path, lora_other: Path) -> None:
    assert content_digest(lora_all) == content_digest(lora_all)
    assert content_digest(lora_all) != content_digest(lora_other)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("not_dir", "is not a directory"),
    ("no_config", "has no adapter_config.json"),
    ("pickle_only", "pickle, which tsugiki never loads"),
    ("corrupt_weights", "not a readable safetensors file"),
    ("bad_json", "not valid JSON"),
    ("nan", "NaN or infinite"),
    ("not_lora", "LoRA adapters only"),
    ("dora", "DoRA adapters are not supported"),
    ("half_pair", "but not its partner"),
    ("rank_zero", "has rank 0"),
    ("embedding", "not a LoRA A/B weight of a linear layer"),
    ("alpha_text", "lora_alpha must be a positive number, got 'x'"),
    ("alpha_null_rank_bool", "r must be a positive number, got True"),
    ("pattern_list", "alpha_pattern must be an object"),
    ("pattern_regex", "rank_pattern key '\\(' is not a regular expression"),
    ("pattern_value", "rank_pattern\\['q_proj'\\] must be a positive number"),
    # Python 3.11 made global flags inside a pattern an error (3.10 only warns, and then matching works too)
    pytest.param("pattern_flags", "rank_pattern key '\\(\\?i\\)q_proj' is not a regular expression",
                 marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="an error only from Python 3.11")),
])
def test_refuses_bad_artifacts(case: str, match: str, lora_all: Path, tmp_path: Path) -> None:
    d = tmp_path / "a"
    if case == "missing":
        pass
    elif case == "not_dir":
        d.write_text("x")
    else:
        _copy(lora_all, d)
        cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
        cfg = json.loads(cfg_file.read_text())
        tensors = load_file(weights)
        if case == "no_config":
            cfg_file.unlink()
        elif case == "pickle_only":
            weights.rename(d / "adapter_model.bin")
        elif case == "corrupt_weights":
            weights.write_bytes(b"\x00garbage" * 100)
        elif case == "bad_json":
            cfg_file.write_text("{not json")
        elif case == "nan":
            k = next(iter(tensors))
            tensors[k][0, 0] = float("nan")
            save_file(tensors, weights)
        elif case == "not_lora":
            cfg["peft_type"] = "IA3"
            cfg_file.write_text(json.dumps(cfg))
        elif case == "dora":
            cfg["use_dora"] = True
            cfg_file.write_text(json.dumps(cfg))
        elif case == "half_pair":
            k = next(k for k in tensors if "lora_B" in k)
            del tensors[k]
            save_file(tensors, weights)
        elif case == "rank_zero":  # an empty pair and no "r" in the config: the scaling divided by zero
            pair = sorted(k for k in tensors if "lora_" in k)[:2]
            for k in pair:
                shape = list(tensors[k].shape)
                shape[0 if "lora_A" in k else 1] = 0
                tensors[k] = torch.zeros(shape)
            save_file(tensors, weights)
            cfg.pop("r", None)
            cfg.pop("rank_pattern", None)
            cfg_file.write_text(json.dumps(cfg))
        elif case == "embedding":
            tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 10)
            save_file(tensors, weights)
        else:  # malformed numbers and patterns in the config: a 4xx naming the field, not a 500
            cfg.update({"alpha_text": {"lora_alpha": "x"}, "alpha_null_rank_bool": {"lora_alpha": None, "r": True},
                        "pattern_list": {"alpha_pattern": [1]}, "pattern_regex": {"rank_pattern": {"(": 4}},
                        "pattern_value": {"rank_pattern": {"q_proj": "four"}},
                        # compiles alone, but not inside PEFT's suffix pattern (global flags must come first)
                        "pattern_flags": {"rank_pattern": {"(?i)q_proj": 4}}}[case])
            cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=match):
        read_lora_artifact(d)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("slow_keys", [
    ["(?:(.)|(.))*\\d"],  # backtracks without end even in `regex`
    # each ends, after ~0.05 s per module here, so no single match runs long; the 14 modules x 8 keys do
    [f"(?:(.)|(.)){{1,16}}\\d{{{k}}}" for k in range(1, 9)],
])
def test_pathological_pattern_keys_neither_hang_nor_crash(lora_all: Path, tmp_path: Path,
                                                          slow_keys: list[str]) -> None:
    """A rank_pattern key that backtracks exponentially under `re` (this one ran past 20 s on a 28-character name)
    loads (it matches nothing); keys slow even for `regex` are refused once all matching passes the budget."""
    d = _copy(lora_all, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"(.*.*)*x": 99}}))
    assert read_lora_artifact(d).modules
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "alpha_pattern": dict.fromkeys(slow_keys, 99)}))
    with pytest.raises(AdapterError, match=r"pattern keys against the module names took over 1.0 s") as e:
        read_lora_artifact(d)
    assert e.value.code == "corrupt_adapter"


def test_a_pattern_key_is_one_suffix_pattern_as_in_peft(lora_all: Path, tmp_path: Path) -> None:
    """PEFT matches ``(.*\\.)?({key})$``: an alternation key covers every module it names, dotted prefix or not."""
    d = _copy(lora_all, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    r = cfg["r"]
    every = "|".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": r // 2, "rank_pattern": {every: r},
                                                       "alpha_pattern": {"v_proj|q_proj": 2 * r}}))
    w = read_lora_artifact(d)  # every module's rank is r by the pattern (r // 2 would be refused)
    assert {m: s for m, s in w.scaling.items() if m.endswith(("v_proj", "q_proj"))} and all(
        s == (2.0 if m.endswith(("v_proj", "q_proj")) else cfg["lora_alpha"] / r) for m, s in w.scaling.items())


def test_null_alpha_and_rank_take_their_defaults(lora_all: Path, tmp_path: Path) -> None:
    d = tmp_path / "a"
    _copy(lora_all, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    r = cfg["r"]
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": None, "r": None}))
    w = read_lora_artifact(d)
    assert set(w.scaling.values()) == {8 / r}  # alpha: PEFT's default 8; the rank: the tensors'


def test_refuses_adapter_that_does_not_fit(foreign_lora: Path, lora_all: Path) -> None:
    w = read_lora_artifact(foreign_lora)
    with pytest.raises(AdapterError, match="does not have as an adaptable linear layer"):
        check_fits(w, _shapes(), max_rank=64, base_name="tiny", where="'f'")
    shapes = _shapes()
    shapes["model.layers.0.mlp.up_proj"] = (64, 256)
    with pytest.raises(AdapterError, match=r"maps 64->128 features but base model 'tiny' has 64->256"):
        check_fits(read_lora_artifact(lora_all), shapes, max_rank=64, base_name="tiny", where="'a'")
    with pytest.raises(AdapterError, match="rank 8 .* above the limit of 4"):
        check_fits(read_lora_artifact(lora_all), _shapes(), max_rank=4, base_name="tiny", where="'a'")


def test_refuses_oversized_file(lora_all: Path) -> None:
    with pytest.raises(AdapterError, match="above the limit"):
        read_lora_artifact(lora_all, max_file_bytes=100)
