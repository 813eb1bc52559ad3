"""Drift references shipped inside adapter directories.

The issue's rule: an adapter's drift reference is built from its tuning data when it has some, otherwise from its
first requests. The tuning job writes ``drift_reference.safetensors`` next to the adapter: the monitor's features
(:func:`prompt_features`) of up to ``TuneConfig.drift_reference`` of its training prompts, computed with the
finished adapter on the base model it was tuned on. When the adapter is loaded through the API, or a model
replica first serves a version of it (an alias's version, or one written to the store directly), the replica
hands them to the monitor (:func:`ship_reference`), which then scores from that request on instead of
collecting the first requests as its reference.

The file is plain safetensors (tensors and string metadata, nothing executable). Its metadata names the base
model fingerprint, the precision and the feature definition; a reference for another base model, precision or
feature definition is ignored (the adapter then falls back to its first requests), never used to raise false
alarms. Adapters trained elsewhere have no such file and load as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from tsugiki.adapters.format import REFERENCE_FILE, AdapterRef

logger = logging.getLogger(__name__)

MIN_REFERENCE = 50  # fewer prompts do not calibrate a detector (the monitor refuses under 40)
# What a feature vector is; a change of definition invalidates references written before it.
FEATURES = "mean-pooled final hidden state of the prompt tokens (decoder output)"


def prompt_features(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int = 16) -> np.ndarray:
    """The monitor's drift features of ``prompts``, computed as the serving engine computes them at prefill:
    the decoder's output (final norm included) mean-pooled over the prompt's tokens, in the model's dtype.
    ``model`` is the transformers or PEFT causal LM with the adapter active. Prompts are tokenised as the
    trainer tokenises them (:func:`~tsugiki.serve.base_model.prompt_ids`: as the gateway tokenises what they
    stand for)."""
    import torch

    from tsugiki.serve.base_model import prompt_ids

    decoder = model.get_decoder()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            encs = [prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
            width = max(len(e) for e in encs)
            # right padding: causal attention keeps padding out of the real tokens, positions start at 0
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in encs], device=device)
            attn = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encs], device=device)
            hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
            mask = attn[:, :, None].to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def write_reference(adapter_dir: Path, features: np.ndarray, *, base_fingerprint: str, dtype: str,
                    source: str) -> Path:
    """``dtype``: the model dtype the features were computed in (``"torch.float32"``); a server computing in
    another precision ignores them (its features differ by more than the detector tolerates)."""
    from safetensors.numpy import save_file

    path = Path(adapter_dir) / REFERENCE_FILE
    save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, str(path),
              metadata={"base_model_fingerprint": base_fingerprint, "features": FEATURES, "dtype": dtype,
                        "source": source})
    return path


def read_reference(adapter_dir: Path, *, base_fingerprint: str, dtype: str | None = None,
                   dim: int | None = None) -> tuple[np.ndarray, str] | None:
    """``(features, source)`` of the reference shipped in ``adapter_dir``, or None when there is none or it does
    not fit this base model and precision (logged, so an operator can tell why the adapter collects its first
    requests)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            features = f.get_tensor("features")
    except Exception as e:  # a damaged file costs the adapter its shipped reference, nothing else
        logger.warning(f"ignoring unreadable drift reference {path}: {type(e).__name__}: {e}")
        return None
    why = None
    if meta.get("base_model_fingerprint") != base_fingerprint:
        why = "it was computed on another base model"
    elif meta.get("features") != FEATURES:
        why = f"its features are {meta.get('features')!r}, this version computes {FEATURES!r}"
    elif dtype is not None and meta.get("dtype") != dtype:
        why = f"it was computed in {meta.get('dtype')}, this server computes in {dtype}"
    elif features.ndim != 2 or (dim is not None and features.shape[1] != dim) or not np.isfinite(features).all():
        why = f"its features have shape {features.shape} or non-finite values"
    if why is not None:
        logger.warning(f"ignoring drift reference {path}: {why}; the adapter's first requests will be its reference")
        return None
    return features, meta.get("source", "tuning data")


# ``await sink(label, features, source, key)``: the monitor's ``set_reference``; ``key`` names the adapter version
# the reference belongs to, so the replicas and the controller that each hand it over set it once.
ReferenceSink = Callable[[str, np.ndarray, str, str], Awaitable[Any]]


def reference_key(ref: AdapterRef) -> str:
    return f"{ref.key}:{ref.digest[:12]}"


class ReferenceNotSet(Exception):
    """The monitor did not take a reference (down, slow or refusing it); worth trying again later."""


async def ship_reference(adapter_dir: Path, label: str, sink: ReferenceSink, *, key: str, base_fingerprint: str,
                         dtype: str | None = None, dim: int | None = None, timeout_s: float = 10.0) -> str | None:
    """Hand the reference shipped in ``adapter_dir`` (the version ``key``) to the monitor as ``label``'s; returns
    its source, or None when there is none or it does not fit (the adapter's first requests then become its
    reference). :class:`ReferenceNotSet` (logged) when the monitor did not take it within ``timeout_s``."""
    import asyncio

    found = await asyncio.to_thread(read_reference, adapter_dir, base_fingerprint=base_fingerprint, dtype=dtype,
                                    dim=dim)
    if found is None:
        return None
    features, source = found
    try:
        await asyncio.wait_for(sink(label, features, source, key), timeout_s)
    except Exception as e:  # the monitor being down or refusing it must not fail a load or a request
        logger.warning(f"drift reference of {label!r} not set: {type(e).__name__}: {e}")
        raise ReferenceNotSet(str(e)) from e
    return source
