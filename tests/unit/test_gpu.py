"""GPU checks: skipped without CUDA (see conftest). Device and dtype come from config, never hard-coded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tsugiki.adapters.store import AdapterStore
from tsugiki.config import AdapterConfig, EngineConfig, ModelConfig
from tsugiki.serve.base_model import load_base_model, pick_dtype
from tsugiki.serve.engine import EngineCore, GenerationRequest
from tsugiki.serve.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def test_auto_device_is_cuda_with_bfloat16(tiny_dir: Path) -> None:
    loaded = load_base_model(ModelConfig(base_model=str(tiny_dir)), progress=False)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_mixed_batch_on_gpu_matches_cpu(tiny_dir: Path, lora_all: Path, lora_qv: Path, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    store.put("all", lora_all)
    store.put("qv", lora_qv)
    outs = {}
    for device in ("cpu", "cuda"):
        loaded = load_base_model(ModelConfig(base_model=str(tiny_dir), device=device, dtype="float32"),
                                 progress=False)
        core = EngineCore(loaded.model, loaded.tokenizer, engine_cfg=EngineConfig(), adapter_cfg=AdapterConfig(),
                          store=store, max_model_len=256)
        got: dict[str, list[float]] = {}
        for i, name in enumerate([None, "all", "qv", "all"]):
            ids = tuple(loaded.tokenizer(f"hello world {i}")["input_ids"])
            p = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
            core.add_request(GenerationRequest(str(i), ids, p, name),
                             lambda ev, i=i, got=got: got.setdefault(str(i), []).append(ev.logprob))
        while core.has_work():
            core.step()
        outs[device] = got
    for k in outs["cpu"]:
        assert max(abs(a - b) for a, b in zip(outs["cpu"][k], outs["cuda"][k])) < 1e-3
