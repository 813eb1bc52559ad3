"""Drift references (features and noise signals) shipped inside adapter directories.

The issue's rule: an adapter's drift reference is built from its tuning data when it has some, otherwise from its
first requests. The tuning job writes ``drift_reference.safetensors`` next to the adapter: the monitor's features
(:func:`prompt_features`) of up to ``TuneConfig.drift_reference`` of its training prompts, computed with the
finished adapter on the base model it was tuned on. When the adapter is loaded through the API, or a model
replica first serves a version of it (an alias's version, or one written to the store directly), the replica
hands them to the monitor (:func:`ship_reference`), which then scores from that request on instead of
collecting the first requests as its reference.

Next to the features it holds the raw noise signals (:func:`tsugiki.monitoring.noise.signals`) of the same
prompts' user text, so the monitor's noise channel has its reference from the first request too; the replica
turns them into noise scores under its own thresholds. Files without them still load (the noise reference is
then collected from the first requests).

The file is plain safetensors (tensors and string metadata, nothing executable). Its metadata names the base
model fingerprint, the precision and the feature definition; a reference for another base model, precision or
feature definition is ignored (the adapter then falls back to its first requests), never used to raise false
alarms. Adapters trained elsewhere have no such file and load as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tsugiki.adapters.format import REFERENCE_FILE, AdapterRef
from tsugiki.monitoring.noise import REASONS, NoiseDetector

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
                    source: str, noise_signals: np.ndarray | None = None) -> Path:
    """``dtype``: the model dtype the features were computed in (``"torch.float32"``); a server computing in
    another precision ignores them (its features differ by more than the detector tolerates).
    ``noise_signals``: the same prompts' raw noise signals, one column per :data:`REASONS` entry."""
    from safetensors.numpy import save_file

    path = Path(adapter_dir) / REFERENCE_FILE
    tensors = {"features": np.ascontiguousarray(features, dtype=np.float32)}
    meta = {"base_model_fingerprint": base_fingerprint, "features": FEATURES, "dtype": dtype, "source": source}
    if noise_signals is not None:
        if noise_signals.shape != (len(features), len(REASONS)):
            raise ValueError(f"noise signals of shape {noise_signals.shape} for {len(features)} prompts and "
                             f"{len(REASONS)} reasons")
        tensors["noise_signals"] = np.ascontiguousarray(noise_signals, dtype=np.float32)
        meta["noise_reasons"] = ",".join(REASONS)
    save_file(tensors, str(path), metadata=meta)
    return path


class ShippedReference(NamedTuple):
    features: np.ndarray
    source: str
    noise_signals: dict[str, np.ndarray] | None  # reason -> one raw signal per prompt; None: not shipped

    def noise_scores(self, detector: NoiseDetector) -> np.ndarray | None:
        """The prompts' text noise scores under ``detector``'s thresholds (:attr:`NoiseReport.text_score`, as
        live requests are scored for the drift detector)."""
        if self.noise_signals is None:
            return None
        n = len(self.features)
        return np.array([detector.judge({r: float(v[i]) for r, v in self.noise_signals.items()}).text_score
                         for i in range(n)])


def read_reference(adapter_dir: Path, *, base_fingerprint: str, dtype: str | None = None,
                   dim: int | None = None) -> ShippedReference | None:
    """The reference shipped in ``adapter_dir`` (features, source, noise signals), or None when there is none or
    it does not fit this base model and precision (logged, so an operator can tell why the adapter collects its
    first requests). Noise signals that do not fit are dropped on their own (logged)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            features = f.get_tensor("features")
            names = set(f.keys())
            raw = f.get_tensor("noise_signals") if "noise_signals" in names else None
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
    noise = None
    if raw is not None:
        reasons = meta.get("noise_reasons", "").split(",")
        if raw.ndim == 2 and raw.shape == (len(features), len(reasons)) and np.isfinite(raw).all():
            noise = {r: raw[:, j] for j, r in enumerate(reasons) if r in REASONS}
        else:
            logger.warning(f"ignoring the noise signals in {path} (shape {raw.shape}, reasons {reasons}): the "
                           "adapter's first requests will be its noise reference")
    return ShippedReference(features, meta.get("source", "tuning data"), noise)


# ``await sink(label, features, source, key, noise)``: the monitor's ``set_reference``; ``key`` names the adapter
# version the reference belongs to, so the replicas and the controller that each hand it over set it once;
# ``noise`` is the prompts' noise scores (None when the file has no noise signals).
ReferenceSink = Callable[[str, np.ndarray, str, str, "np.ndarray | None"], Awaitable[Any]]


def reference_key(ref: AdapterRef) -> str:
    return f"{ref.key}:{ref.digest[:12]}"


class ReferenceNotSet(Exception):
    """The monitor did not take a reference (down, slow or refusing it); worth trying again later."""


async def ship_reference(adapter_dir: Path, label: str, sink: ReferenceSink, *, key: str, base_fingerprint: str,
                         dtype: str | None = None, dim: int | None = None, noise: NoiseDetector | None = None,
                         timeout_s: float = 10.0) -> str | None:
    """Hand the reference shipped in ``adapter_dir`` (the version ``key``) to the monitor as ``label``'s, with
    its prompts' noise scores under ``noise`` (the replica's noise detector); returns its source, or None when
    there is none or it does not fit (the adapter's first requests then become its reference).
    :class:`ReferenceNotSet` (logged) when the monitor did not take it within ``timeout_s``."""
    import asyncio

    found = await asyncio.to_thread(read_reference, adapter_dir, base_fingerprint=base_fingerprint, dtype=dtype,
                                    dim=dim)
    if found is None:
        return None
    scores = found.noise_scores(noise) if noise is not None else None
    try:
        await asyncio.wait_for(sink(label, found.features, found.source, key, scores), timeout_s)
    except Exception as e:  # the monitor being down or refusing it must not fail a load or a request
        logger.warning(f"drift reference of {label!r} not set: {type(e).__name__}: {e}")
        raise ReferenceNotSet(str(e)) from e
    return found.source
