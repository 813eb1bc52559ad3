"""Shared fixtures: a tiny random llama saved as a local model directory, and PEFT adapters for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import make_lora, make_tiny_llama


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def lora_all(tiny_dir: Path, adapter_root: Path) -> Path:
    """rank 8 on every linear layer."""
    return make_lora(tiny_dir, adapter_root / "all-linear", seed=1)


@pytest.fixture(scope="session")
def lora_qv(tiny_dir: Path, adapter_root: Path) -> Path:
    """rank 4 on q_proj and v_proj only, a different alpha."""
    return make_lora(tiny_dir, adapter_root / "qv", seed=2, r=4, alpha=4, targets=["q_proj", "v_proj"])


@pytest.fixture(scope="session")
def lora_other(tiny_dir: Path, adapter_root: Path) -> Path:
    """Same shapes as lora_all, different weights (a 'retrained' version)."""
    return make_lora(tiny_dir, adapter_root / "all-linear-v2", seed=3)


@pytest.fixture(scope="session")
def foreign_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter for a different base model (3 layers instead of 2)."""
    other = make_tiny_llama(tmp_path_factory.mktemp("other") / "other-llama", layers=3, seed=5)
    return make_lora(other, tmp_path_factory.mktemp("foreign") / "foreign", seed=4)
