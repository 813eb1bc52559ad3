"""Reading and validating standard PEFT LoRA artifacts.

An adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``,
as written by PEFT's ``save_pretrained``; adapters trained elsewhere load as they are.
Only safetensors are read: pickled ``adapter_model.bin`` files are refused, never unpickled.

Supported: plain LoRA on linear layers (any rank/alpha, ``rank_pattern``/``alpha_pattern``,
rsLoRA scaling). Refused with a reason: DoRA, LoRA on embeddings, ``modules_to_save``,
LoRA biases and Conv1D (``fan_in_fan_out``) layers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch

from tsugiki.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "model_card.json"  # optional provenance written by the tuning job
REFERENCE_FILE = "drift_reference.safetensors"  # optional drift reference (tsugiki.monitoring.reference)
LEXICON_FILE = "lexicon.json"  # optional word recognition in front of the adapter (tsugiki.adapters.lexicon)
# travel with the weights; of them only the lexicon is part of the content digest (it changes what the model is
# handed), the card and drift reference describe the version
COMPANION_FILES = (CARD_FILE, REFERENCE_FILE, LEXICON_FILE)
# rank_pattern/alpha_pattern keys are regular expressions from the artifact; Python's `re` has no time limit, and a
# key like "(.*.*)*x" backtracks for hours on a module name, hanging the replica that loads it. They are matched
# with the `regex` module (re-compatible syntax, a transformers dependency), which avoids most such blow-ups, within
# this many seconds for all of an artifact's keys and modules (real keys take microseconds; a limit per match would
# let many slow keys times hundreds of modules add up to minutes).
PATTERN_BUDGET_S = 1.0
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterRef:
    """Identity of one immutable adapter version: user-facing ``name`` plus store ``version`` and content ``digest``."""

    name: str
    version: int
    digest: str

    @property
    def key(self) -> str:
        """Internal id of this version (the name alone may point at a newer version later)."""
        return f"{self.name}@v{self.version}"

    @property
    def slot(self) -> str:
        """Id of these weights on a replica (cache and LoRA layers): the key and the digest, since a version
        loaded directly and a registry version of the same name and number may hold different content."""
        return f"{self.key}#{self.digest[:16]}"


@dataclass
class LoraWeights:
    """One adapter's weights, ready for the engine.

    For each adapted linear module ``m`` (named as in the base model, e.g. ``model.layers.0.self_attn.q_proj``):
    ``modules[m] = (A, B)`` with ``A: [r, in]`` and ``B: [out, r]``, so that
    ``y = base(x) + scaling[m] * (x @ A.T) @ B.T``.
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]
    config: dict[str, Any]
    digest: str
    nbytes: int = 0
    ref: AdapterRef | None = field(default=None)

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)


def artifact_files(path: Path) -> tuple[Path, Path]:
    """The config and weights files of an adapter directory, or an :class:`AdapterError` saying what is wrong."""
    if not path.exists():
        raise AdapterError(f"adapter path {str(path)!r} does not exist", param="path", code="adapter_not_found")
    if not path.is_dir():
        raise AdapterError(f"adapter path {str(path)!r} is not a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}",
                           param="path")
    cfg, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg.is_file():
        raise AdapterError(f"{str(path)!r} has no {CONFIG_FILE}; is it a PEFT adapter directory?", param="path")
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"{str(path)!r} holds adapter_model.bin (a pickle, which tsugiki never loads); re-save it with "
                "PEFT's save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors",
                param="path", code="unsafe_adapter_format")
        raise AdapterError(f"{str(path)!r} has no {WEIGHTS_FILE}", param="path")
    return cfg, weights


def content_digest(path: Path) -> str:
    """sha256 over the adapter's config (canonical JSON), weights bytes and, when it ships one, its lexicon's bytes:
    the identity of what it serves. The lexicon corrects the user's words before the model sees them, so the same
    weights behind another lexicon are another version (and a lexicon changed in an artifact store fails the
    digest check like changed weights). Without a lexicon the digest is that of config and weights alone."""
    cfg_file, weights_file = artifact_files(path)
    h = hashlib.sha256()
    h.update(json.dumps(_read_config(cfg_file), sort_keys=True).encode())
    with weights_file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    lexicon = path / LEXICON_FILE
    if lexicon.is_file():
        # a safetensors file's header indexes every byte of it, so no valid weights file ends in these bytes
        h.update(b"\0" + LEXICON_FILE.encode() + b"\0")
        h.update(lexicon.read_bytes())
    return h.hexdigest()


def _read_config(cfg_file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}", param="path", code="corrupt_adapter") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file} must hold a JSON object", param="path", code="corrupt_adapter")
    return cfg


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise AdapterError(f"{where}: peft_type is {cfg.get('peft_type')!r}; tsugiki serves LoRA adapters only",
                           param="path", code="unsupported_adapter")
    unsupported = {
        "use_dora": "DoRA adapters",
        "modules_to_save": "adapters with modules_to_save (full copies of base layers)",
        "fan_in_fan_out": "Conv1D (fan_in_fan_out) adapters",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise AdapterError(f"{where}: {what} are not supported ({key}={cfg[key]!r}); retrain as plain LoRA",
                               param="path", code="unsupported_adapter")
    if cfg.get("lora_bias") or cfg.get("bias") not in (None, "none"):
        raise AdapterError(f"{where}: LoRA adapters with trained biases are not supported; retrain with bias='none'",
                           param="path", code="unsupported_adapter")

    def bad(msg: str) -> AdapterError:
        return AdapterError(f"{where}: {msg}", param="path", code="corrupt_adapter")

    def number(value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad(f"{what} must be a positive number, got {value!r}")

    for key in ("r", "lora_alpha"):
        if cfg.get(key) is not None:
            number(cfg[key], key)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(f"{key} must be an object of module pattern -> number, got {type(pattern).__name__}")
        for k, v in pattern.items():
            number(v, f"{key}[{k!r}]")
            try:  # PEFT matches with `re`; tsugiki with `regex`: a key must be valid for both
                re.compile(_pattern_regex(k))
                regex.compile(_pattern_regex(k))
            except (re.error, regex.error) as e:
                raise bad(f"{key} key {k!r} is not a regular expression: {e}") from None


def _pattern_regex(key: str) -> str:
    r"""PEFT's reading of a ``rank_pattern``/``alpha_pattern`` key (``(.*\.)?({key})$``): the module's name, or its
    dotted suffix; the key grouped, so an alternation ("q_proj|v_proj") is one suffix pattern."""
    return rf"(?:.*\.)?(?:{key})"


def _pattern_value(pattern: dict[str, Any], module: str, default: float, where: Path, deadline: float) -> float:
    for key, value in (pattern or {}).items():
        try:
            hit = regex.fullmatch(_pattern_regex(key), module, timeout=max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            raise AdapterError(f"{where}: matching the rank/alpha pattern keys against the module names took over "
                               f"{PATTERN_BUDGET_S} s (catastrophic backtracking, at key {key!r} on module "
                               f"{module!r}); use module names or dotted suffixes of them", param="path",
                               code="corrupt_adapter") from None
        if hit:
            return float(value)
    return default


def read_lora_artifact(path: str | Path, *, max_file_bytes: int = 512 * 2**20) -> LoraWeights:
    """Read and structurally validate a PEFT LoRA directory (CPU tensors, float32).

    Checks that apply without the base model: files present and safetensors, config is LoRA without unsupported
    features, every tensor is a finite LoRA A/B pair with matching rank. :func:`check_fits` checks the base model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = artifact_files(path)
    size = weights_file.stat().st_size
    if size > max_file_bytes:
        raise AdapterError(f"{weights_file} is {size} bytes, above the limit of {max_file_bytes} "
                           "(adapters.max_file_bytes)", param="path", code="adapter_too_large")
    cfg = _read_config(cfg_file)
    _check_config(cfg, path)
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{weights_file} is not a readable safetensors file: {e}", param="path",
                           code="corrupt_adapter") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                               "(embedding LoRA, DoRA magnitudes and full layer copies are not supported)",
                               param="path", code="unsupported_adapter")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise AdapterError(f"{weights_file} holds no LoRA weights", param="path", code="corrupt_adapter")

    alpha = float(cfg["lora_alpha"] if cfg.get("lora_alpha") is not None else cfg.get("r") or 8)
    deadline = time.monotonic() + PATTERN_BUDGET_S
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scaling: dict[str, float] = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: module {name!r} has lora_{'A' if 'A' in ab else 'B'} "
                               "but not its partner", param="path", code="corrupt_adapter")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{weights_file}: module {name!r} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}; expected [r, in] and [out, r]", param="path",
                               code="corrupt_adapter")
        if a.shape[0] == 0:
            raise AdapterError(f"{weights_file}: module {name!r} has rank 0 (lora_A {tuple(a.shape)}); a LoRA "
                               "module needs rank 1 or more", param="path", code="corrupt_adapter")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{weights_file}: module {name!r} weights are not floating point", param="path",
                               code="corrupt_adapter")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{weights_file}: module {name!r} holds NaN or infinite values", param="path",
                               code="corrupt_adapter")
        r = a.shape[0]
        r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, name, float(cfg.get("r") or r), weights_file, deadline)
        a_m = _pattern_value(cfg.get("alpha_pattern") or {}, name, alpha, weights_file, deadline)
        if int(r_cfg) != r:
            raise AdapterError(f"{weights_file}: module {name!r} has rank {r} but the config says {int(r_cfg)}",
                               param="path", code="corrupt_adapter")
        scaling[name] = a_m / math.sqrt(r) if cfg.get("use_rslora") else a_m / r
        modules[name] = (a.contiguous(), b.contiguous())
    return LoraWeights(modules=modules, scaling=scaling, config=cfg, digest="", nbytes=size)


def peft_loadable_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy of the artifact at ``src`` in the new directory ``dst`` that PEFT's own loader can be given safely.

    The artifact is read and checked first (:func:`read_lora_artifact`: no pickles, patterns matched with a time
    limit); the copy's config then names every module's rank and alpha literally (escaped full names), because PEFT
    matches ``rank_pattern``/``alpha_pattern`` keys with ``re``, which has no time limit.
    """
    w = read_lora_artifact(src)
    _, weights_file = artifact_files(Path(src))
    dst = Path(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(weights_file, dst / WEIGHTS_FILE)
    cfg = dict(w.config)
    ranks = {m: int(a.shape[0]) for m, (a, _) in w.modules.items()}
    cfg["rank_pattern"] = {re.escape(m): r for m, r in ranks.items()}
    root = math.sqrt if cfg.get("use_rslora") else float
    cfg["alpha_pattern"] = {re.escape(m): w.scaling[m] * root(r) for m, r in ranks.items()}
    (dst / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    return dst


def check_fits(weights: LoraWeights, shapes: dict[str, tuple[int, int]], *, max_rank: int, base_name: str,
               where: str) -> None:
    """Refuse an adapter that does not fit the base model: unknown modules, wrong shapes, rank above the limit.

    ``shapes`` maps each adaptable linear module of the base model to ``(in_features, out_features)``.
    """
    trained_for = weights.config.get("base_model_name_or_path") or "an unnamed base model"
    for name, (a, b) in weights.modules.items():
        if name not in shapes:
            raise AdapterError(
                f"adapter {where} targets module {name!r}, which base model {base_name!r} does not have as an "
                f"adaptable linear layer; it was trained for {trained_for!r}", param="path", code="adapter_mismatch")
        fan_in, fan_out = shapes[name]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterError(
                f"adapter {where} module {name!r} maps {a.shape[1]}->{b.shape[0]} features but base model "
                f"{base_name!r} has {fan_in}->{fan_out}; it was trained for {trained_for!r}",
                param="path", code="adapter_mismatch")
        if a.shape[0] > max_rank:
            raise AdapterError(f"adapter {where} has rank {a.shape[0]} on {name!r}, above the limit of {max_rank} "
                               "(adapters.max_rank)", param="path", code="adapter_rank_too_large")
