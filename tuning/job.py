"""The tuning job: data → layer choice → (robust) training → strength choice → gate → adapter store.

:func:`run_local` does the work in this process; :func:`submit` runs it as a Ray task that declares its CPUs
and GPUs (on a KubeRay cluster it lands on a worker with a GPU; on a laptop it runs locally), and
:func:`tune` waits for it. A run is identified by its name, configuration and data hash: running the same
job again resumes from its last checkpoint, and Ray retries a task whose worker died the same way.

A candidate that fails the gate is kept aside (``<work_dir>/<name>/<run_id>/rejected``) with its report and is
never written to the store; a passing one becomes a new store version with ``model_card.json`` beside it (and
``lexicon.json``, the word recognition the gateway puts in front of it, tsugiki/adapters/lexicon.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from tsugiki.adapters.format import CARD_FILE, CONFIG_FILE, peft_loadable_copy
from tsugiki.adapters.lexicon import Lexicon, common_words, english_words
from tsugiki.adapters.store import AdapterStore, check_name
from tsugiki.config import default_home
from tsugiki.errors import AdapterError
from tsugiki.monitoring.noise import REASONS, word_frequencies
from tsugiki.monitoring.noise import signals as noise_signals
from tsugiki.monitoring.reference import MIN_REFERENCE, prompt_features, write_reference
from tsugiki.serve.base_model import LoadedBaseModel, load_base_model, set_torch_threads
from tsugiki.tuning.config import TuneConfig
from tsugiki.tuning.data import Example, TuningData, load_jsonl
from tsugiki.tuning.denoise import Denoiser, denoise_layers, lora_params
from tsugiki.tuning.denoise import pairs as denoise_pairs
from tsugiki.tuning.gate import GateReport, agreement, decide
from tsugiki.tuning.trainer import (
    Parts,
    Trainer,
    TrainResult,
    encode,
    evaluate,
    next_token_argmax,
    pad_right,
    run_layers,
)

log = logging.getLogger("tsugiki.tuning")
RETAIN_TEXTS = Path(__file__).with_name("retain_texts.json")


@dataclass
class TuneResult:
    name: str
    run_id: str
    status: str  # "written" (to the store) | "passed" (kept for the registry, to_store=False) | "rejected"
    adapter: str | None  # store key (name@vN-digest) when written
    path: str  # the stored version, or the rejected candidate
    gate: dict[str, Any]
    train: dict[str, Any]
    card: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- layers
def choose_layers(cfg: TuneConfig, model: Any, tokenizer: Any, train: list[Example]) -> tuple[list[int],
                                                                                             dict[int, float]]:
    """Which decoder layers get LoRA. 'probe' ranks layers by relative gradient size on one small batch."""
    n = len(Parts.of(model).layers)
    if isinstance(cfg.layers, tuple):
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad or not cfg.layers:
            raise ValueError(f"layers {list(cfg.layers)} are not in 0..{n - 1}")
        return sorted(set(cfg.layers)), {}
    if cfg.layers == "all" or cfg.method == "full":
        return list(range(n)), {}
    k = min(cfg.num_layers, n)
    if cfg.layers == "upper":
        return list(range(n - k, n)), {}
    return probe_layers(cfg, model, tokenizer, train, k)


def probe_layers(cfg: TuneConfig, model: Any, tokenizer: Any, train: list[Example], k: int
                 ) -> tuple[list[int], dict[int, float]]:
    """One forward/backward on up to 16 examples; a layer's score is the sum over the target modules of
    ``|grad W| / |W|`` (how far one step would move it, relative to its size)."""
    parts = Parts.of(model)
    batch = train[:16]
    encs = [encode(tokenizer, e.prompt, e.completion, cfg.max_length) for e in batch]
    dev = next(model.parameters()).device
    ids = pad_right([torch.tensor(e.ids, device=dev) for e in encs])
    weights: dict[int, list[torch.nn.Parameter]] = {}
    for i, layer in enumerate(parts.layers):
        for name, mod in layer.named_modules():
            if name.split(".")[-1] in cfg.target_modules and hasattr(mod, "weight"):
                weights.setdefault(i, []).append(mod.weight)
    flat = [w for ws in weights.values() for w in ws]
    was = [w.requires_grad for w in model.parameters()]
    model.requires_grad_(False)
    for w in flat:
        w.requires_grad_(True)
    try:
        h = parts.norm(run_layers(parts, parts.embed(ids), [len(e.ids) for e in encs], 0))
        rows = [(b, j) for b, e in enumerate(encs) for j in range(e.n_prompt, len(e.ids))]
        sel = h[[r for r, _ in rows], [j - 1 for _, j in rows]]
        target = torch.tensor([encs[b].ids[j] for b, j in rows], device=dev)
        torch.nn.functional.cross_entropy(parts.head(sel).float(), target).backward()
        scores = {i: float(sum((w.grad.norm() / w.detach().norm().clamp_min(1e-12)) for w in ws
                               if w.grad is not None)) for i, ws in weights.items()}
    finally:
        for w in flat:
            w.grad = None
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    chosen = sorted(sorted(scores, key=lambda i: -scores[i])[:k])
    return chosen, scores


def build_model(cfg: TuneConfig, base: Any, layers: list[int]) -> Any:
    if cfg.method == "full":
        base.requires_grad_(True)
        return base
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=list(cfg.target_modules), layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(base, lcfg)


def set_strength(model: Any, strength: float) -> None:
    """Scale every LoRA delta by ``strength``: a point on the line between the base model (0) and the tuned
    adapter (1) in weight space (WiSE-FT's interpolation, exact for LoRA)."""
    from peft.tuners.lora import LoraLayer

    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            for name in mod.scaling:
                base = mod.lora_alpha[name] / mod.r[name]
                mod.scaling[name] = base * strength


# ---------------------------------------------------------------------------------------------- fit / gate
def fit(cfg: TuneConfig, loaded: LoadedBaseModel, data: TuningData, *, checkpoint_dir: Path | None = None,
        progress: bool = True, lexicon: Lexicon | None = None) -> tuple[Any, TrainResult]:
    """Choose layers, build the model (LoRA or full) and train it; returns (model, result).

    ``lexicon``: the one the adapter will ship (:func:`build_lexicon`, built here when not given); with
    ``robust.corrected_copies`` the training inputs are read through it, as the gateway will hand them to the
    model."""
    torch.manual_seed(cfg.seed)
    layers, scores = choose_layers(cfg, loaded.model, loaded.tokenizer, data.train)
    lower = denoise_layers(cfg, layers)
    aligned = denoise_pairs(loaded.tokenizer, data.train, cfg) if lower else None
    if aligned is not None and not aligned[1]:
        log.warning("no corrupted copy lines up with its clean input word by word (chats, or no character-level "
                    "families): no denoiser")
        lower = []
    model = build_model(cfg, loaded.model, lower + layers)
    den = None
    if lower:  # stage 1 (robust recipe): the denoiser below the task layers, then frozen
        den = Denoiser(cfg, model, loaded.tokenizer, data.train, lower, progress=progress, aligned=aligned,
                       checkpoint_dir=checkpoint_dir.with_name("denoiser") if checkpoint_dir else None).train()
    trainer = Trainer(cfg, model, loaded.tokenizer, data.train, layers=layers, layer_scores=scores,
                      checkpoint_dir=checkpoint_dir, progress=progress,
                      lexicon=training_lexicon(cfg, loaded.tokenizer, data.train, lexicon))
    result = trainer.train()
    if den is not None:
        result.denoise = den.to_dict()
        result.trainable_params += den.params
    return model, result


def build_lexicon(cfg: TuneConfig, tokenizer: Any, train: Sequence[Example]) -> Lexicon | None:
    """The word-recognition lexicon the adapter ships (``robust.lexicon``): the training examples' user words,
    with the base model's common words and frequent English words left alone; None when off or when no example
    has free text (chats)."""
    texts = [e.text for e in train if e.text is not None]
    if cfg.robust is None or not cfg.robust.lexicon or not texts:
        return None
    return Lexicon.build(texts, common_words(tokenizer) | english_words(word_frequencies()))


def training_lexicon(cfg: TuneConfig, tokenizer: Any, train: Sequence[Example], lexicon: Lexicon | None = None
                     ) -> Lexicon | None:
    """The lexicon training reads its inputs through: with ``robust.corrected_copies`` the adapter's own
    (``lexicon``, or built from ``train``), otherwise none (training reads the raw inputs)."""
    if cfg.robust is None or not cfg.robust.corrected_copies:
        return None
    return lexicon if lexicon is not None else build_lexicon(cfg, tokenizer, train)


def _val(cfg: TuneConfig, data: TuningData) -> list[Example]:
    return data.val[: cfg.max_eval_examples]


def pick_strength(cfg: TuneConfig, model: Any, tokenizer: Any, val: list[Example], layers: list[int], *,
                  retain_texts: Sequence[str] = (), lexicon: Lexicon | None = None
                  ) -> tuple[float, dict[float, dict[str, float]]]:
    """The strength with the lowest mean of clean and noisy validation loss (ties: the larger).

    Teacher-forced loss over the completion tokens, with the frozen prefix computed once for all strengths:
    a few forward passes of the tuned layers instead of generating every validation answer per strength
    (the gate then measures accuracy at the chosen one).

    With ``retain_texts``, each strength's retained agreement with the base model on them is measured too (the
    gate's retained-behaviour check), and strengths below ``cfg.gate.min_retained_agreement`` are passed over
    while any strength meets it: interpolating towards the base model is WiSE-FT's way of keeping its behaviour,
    so a candidate that fits its task a little less but keeps the base model's behaviour beats one the gate
    would reject.

    With ``lexicon`` the validation inputs are scored as the gateway hands them to the model (corrected).
    """
    rc = cfg.robust
    strengths = rc.strengths if rc is not None and rc.strengths else (1.0,)
    if len(set(strengths)) == 1:
        set_strength(model, strengths[0])
        return strengths[0], {}
    # the scorer caches the hidden states entering the lowest task layer; a denoiser below it scales with the
    # strength too, so then each strength needs its own
    below = bool(lora_params(model, range(min(layers))))
    scorer = None
    base = None
    if retain_texts and cfg.gate.min_retained_agreement > 0:
        with model.disable_adapter():
            base = next_token_argmax(model, tokenizer, retain_texts, cfg.eval_batch_size)
    table: dict[float, dict[str, float]] = {}
    for s in sorted(set(strengths)):
        set_strength(model, s)
        if scorer is None or below:
            scorer = Trainer(cfg, model, tokenizer, val, layers=layers, progress=False, lexicon=lexicon)
        clean, noisy = scorer.mean_loss(0), scorer.mean_loss(1)
        table[s] = {"clean_loss": clean, "noisy_loss": noisy, "score": (clean + noisy) / 2}
        if base is not None:
            table[s]["retained"] = agreement(base, next_token_argmax(model, tokenizer, retain_texts,
                                                                     cfg.eval_batch_size))
    keeps = [s for s in table if table[s].get("retained", 1.0) >= cfg.gate.min_retained_agreement]
    best = min(keeps or list(table), key=lambda s: (round(table[s]["score"], 6), -s))
    set_strength(model, best)
    return best, table


def _served_lexicon(adapter_dir: Path) -> Lexicon | None:
    """The lexicon a stored version is served behind: its own, or none when it has none or it cannot be read (a
    gateway then serves it without, too)."""
    try:
        return Lexicon.load(adapter_dir)
    except AdapterError as e:
        log.warning("incumbent's lexicon unusable, measured without: %s", e)
        return None


def run_gate(cfg: TuneConfig, model: Any, tokenizer: Any, val: list[Example], *, strength: float,
             incumbent_dir: Path | None, retain_texts: list[str], retained: float | None = None,
             lexicon: Lexicon | None = None) -> GateReport:
    """The gate's numbers for the model as it is; ``retained``: the retained agreement on ``retain_texts`` at this
    strength when the strength choice already measured it (else it is measured here). The candidate is measured
    behind ``lexicon`` and the incumbent behind its own, as the gateway serves each."""
    clean = evaluate(model, tokenizer, val, batch_size=cfg.eval_batch_size, lexicon=lexicon)
    fams = {f: evaluate(model, tokenizer, val, family=f, severity=cfg.gate.severity, seed=cfg.seed + 1,
                        batch_size=cfg.eval_batch_size, lexicon=lexicon) for f in cfg.gate.families}
    incumbent = None
    if incumbent_dir is not None:
        with tempfile.TemporaryDirectory(prefix="incumbent-") as tmp:  # checked, and its patterns made literal
            model.load_adapter(str(peft_loadable_copy(incumbent_dir, Path(tmp) / "a")), adapter_name="incumbent")
        model.set_adapter("incumbent")
        try:
            incumbent = evaluate(model, tokenizer, val, batch_size=cfg.eval_batch_size,
                                 lexicon=_served_lexicon(incumbent_dir))
        finally:
            model.set_adapter("default")
            model.delete_adapter("incumbent")
    with model.disable_adapter():
        base_clean = evaluate(model, tokenizer, val, batch_size=cfg.eval_batch_size)
    if retained is None and retain_texts:
        cand = next_token_argmax(model, tokenizer, retain_texts, cfg.eval_batch_size)
        with model.disable_adapter():
            base = next_token_argmax(model, tokenizer, retain_texts, cfg.eval_batch_size)
        retained = agreement(base, cand)
    return decide(cfg.gate, clean=clean, families=fams, incumbent=incumbent, retained=retained, strength=strength,
                  base=base_clean)


# ---------------------------------------------------------------------------------------------- the job
def drift_reference(cfg: TuneConfig, model: Any, tokenizer: Any, data: TuningData
                    ) -> tuple[tuple[np.ndarray, np.ndarray | None] | None, dict[str, Any]]:
    """The monitor's features of up to ``cfg.drift_reference`` training and validation prompts (a seeded
    sample), computed with the finished adapter, and their user text's raw noise signals (None for chats): the
    adapter's drift reference (monitoring/reference.py). None
    (and the card says why) with fewer than MIN_REFERENCE distinct prompts: too few to calibrate a detector on,
    so the adapter's first requests will be its reference."""
    prompts = sorted({e.prompt for e in data.train + data.val})
    if len(prompts) < MIN_REFERENCE:
        return None, {"prompts": 0, "why": f"{len(prompts)} distinct prompts, {MIN_REFERENCE} needed; the "
                                           "adapter's first requests will be its drift reference"}
    random.Random(cfg.seed).shuffle(prompts)
    prompts = prompts[:cfg.drift_reference]
    t0 = time.time()
    feats = prompt_features(model, tokenizer, prompts, batch_size=cfg.eval_batch_size)
    # the noise channel's reference: the raw noise signals of the text a replica scores (the user's words)
    user_text = {e.prompt: e.text for e in data.train + data.val}
    texts = [user_text[p] for p in prompts]
    noise = None
    if all(t is not None for t in texts):  # chats keep no user text apart: their noise reference is live traffic
        noise = np.array([[sig[r] for r in REASONS] for sig in map(noise_signals, cast(list[str], texts))])
    record = {"prompts": len(prompts), "seconds": round(time.time() - t0, 2), "data_hash": data.data_hash,
              "source": f"tuning data ({len(prompts)} prompts, data {data.data_hash[:12]})",
              "noise_signals": noise is not None}
    log.info("drift reference: %d prompts in %.1f s", len(prompts), record["seconds"])
    return (feats, noise), record


def run_id(name: str, cfg: TuneConfig, data_hash: str) -> str:
    return hashlib.sha256(f"{name}\0{cfg.fingerprint()}\0{data_hash}".encode()).hexdigest()[:12]


def chat_template(tokenizer: Any) -> Callable[[list[dict[str, str]]], str] | None:
    """Renders a chat record's prompt with the tokenizer's template (None: the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda msgs: str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def default_retain_texts() -> list[str]:
    return list(json.loads(RETAIN_TEXTS.read_text())["texts"])


def run_local(cfg: TuneConfig, data_path: str | Path, name: str, *, val_path: str | Path | None = None,
              store_dir: str | Path | None = None, work_dir: str | Path | None = None,
              retain_texts: list[str] | None = None, progress: bool = True,
              screen_record: dict[str, Any] | None = None, incumbent_dir: str | Path | None = None,
              to_store: bool = True) -> TuneResult:
    """The whole job in this process (what the Ray task runs).

    ``incumbent_dir``: the adapter the candidate would replace (for the negative flip rate); default: the
    store's active version of ``name``. ``to_store=False`` (the refresh loop, which registers candidates in the
    registry itself): a passing candidate stays in ``<run dir>/candidate`` with status ``passed``.
    """
    check_name(name)
    if cfg.method != "lora":
        raise ValueError("the tuning job writes LoRA adapters; method 'full' is a benchmark baseline (use fit())")
    threads = set_torch_threads(max(1, int(cfg.num_cpus)))
    t0 = time.time()
    loaded = load_base_model(cfg.model, progress=progress)
    tok = loaded.tokenizer

    data = load_jsonl(data_path, val_share=cfg.val_share, val_path=val_path, chat_template=chat_template(tok))
    rid = run_id(name, cfg, data.data_hash)
    run_dir = Path(work_dir or default_home() / "tuning") / name / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("tuning %s run %s: %s; torch threads %d", name, rid, data.summary(), threads)
    lexicon = build_lexicon(cfg, tok, data.train)
    model, result = fit(cfg, loaded, data, checkpoint_dir=run_dir / "checkpoint", progress=progress,
                        lexicon=lexicon)
    val = _val(cfg, data)
    retain = default_retain_texts() if retain_texts is None else retain_texts
    strength, strengths = pick_strength(cfg, model, tok, val, result.layers, retain_texts=retain, lexicon=lexicon)
    store = AdapterStore(store_dir or default_home() / "adapters")
    inc_ref = store.resolve(name) if incumbent_dir is None else None
    incumbent = Path(incumbent_dir) if incumbent_dir is not None else (
        store.path_of(inc_ref) if inc_ref is not None else None)
    report = run_gate(cfg, model, tok, val, strength=strength, incumbent_dir=incumbent, retain_texts=retain,
                      retained=strengths.get(strength, {}).get("retained"), lexicon=lexicon)
    reference, ref_record = None, None
    if report.passed and cfg.drift_reference:
        set_strength(model, strength)  # the features of the adapter as written
        try:
            reference, ref_record = drift_reference(cfg, model, tok, data)
        except Exception as e:  # a passing adapter is worth writing without one (it falls back to first requests)
            log.warning("no drift reference: %s: %s", type(e).__name__, e)
            ref_record = {"prompts": 0, "why": f"computing it failed: {type(e).__name__}: {e}"}
    card = {
        "name": name, "run_id": rid, "created": time.time(), "base_model": loaded.info.name,
        "base_model_fingerprint": loaded.info.fingerprint, "data": data.summary(),
        "labels": data.labels, "config": cfg.model_dump(mode="json"),
        "layers": result.layers, "layer_scores": {str(k): v for k, v in result.layer_scores.items()},
        "denoise": result.denoise,
        "strength": strength, "strength_table": {str(k): v for k, v in strengths.items()},
        "train": {"steps": result.steps, "seconds": round(result.seconds, 2), "final_loss": result.final_loss,
                  "trainable_params": result.trainable_params, "resumed_from": result.resumed_from,
                  "torch_threads": threads},
        "gate": report.to_dict(),
        "parent": inc_ref.key if inc_ref is not None else (str(incumbent_dir) if incumbent_dir else None),
        "wall_seconds": round(time.time() - t0, 2), "screen": screen_record,
        "drift_reference": ref_record,
        "lexicon": {"words": len(lexicon.counts), "known": len(lexicon.known)} if lexicon is not None else None,
    }
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        out = Path(tmp) / "adapter"
        model.save_pretrained(str(out))  # the 'default' adapter: files land directly in `out`
        cfg_file = out / CONFIG_FILE
        acfg = json.loads(cfg_file.read_text())
        # the chosen strength, as standard PEFT config: scaling = lora_alpha / r
        acfg["lora_alpha"] = acfg["lora_alpha"] * strength
        acfg["alpha_pattern"] = {k: v * strength for k, v in (acfg.get("alpha_pattern") or {}).items()}
        cfg_file.write_text(json.dumps(acfg, indent=1))
        (out / CARD_FILE).write_text(json.dumps(card, indent=1, default=str))
        if lexicon is not None:
            lexicon.save(out)
        if reference is not None and ref_record is not None:
            write_reference(out, reference[0], base_fingerprint=loaded.info.fingerprint, dtype=str(model.dtype),
                            source=ref_record["source"], noise_signals=reference[1])
        (run_dir / "report.json").write_text(json.dumps(card, indent=1, default=str))
        if report.passed and not to_store:
            kept = run_dir / "candidate"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.move(str(out), kept)
            log.info("gate passed; candidate kept at %s", kept)
            return TuneResult(name, rid, "passed", None, str(kept), report.to_dict(), card["train"], card)
        if report.passed:
            ref = store.put(name, out)
            log.info("gate passed; wrote %s", ref.key)
            return TuneResult(name, rid, "written", ref.key, str(store.path_of(ref)), report.to_dict(),
                              card["train"], card)
        rejected = run_dir / "rejected"
        shutil.rmtree(rejected, ignore_errors=True)
        shutil.move(str(out), rejected)
    log.warning("gate failed for %s: %s; candidate kept at %s", name, "; ".join(report.failures), rejected)
    return TuneResult(name, rid, "rejected", None, str(rejected), report.to_dict(), card["train"], card)


def _remote(cfg_json: dict[str, Any], data_text: str, val_text: str | None, name: str,
            kwargs: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: the data travels with the task, so any worker can run it."""
    cfg = TuneConfig(**cfg_json)
    work = Path(kwargs.pop("work_dir", None) or default_home() / "tuning")
    inbox = work / name / "inputs"
    inbox.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data_text.encode()).hexdigest()[:12]
    data_file = inbox / f"train-{digest}.jsonl"
    data_file.write_text(data_text, encoding="utf-8")
    val_file = None
    if val_text is not None:
        val_file = inbox / f"val-{hashlib.sha256(val_text.encode()).hexdigest()[:12]}.jsonl"
        val_file.write_text(val_text, encoding="utf-8")
    return run_local(cfg, data_file, name, val_path=val_file, work_dir=work, **kwargs).to_dict()


def submit(cfg: TuneConfig, data_path: str | Path, name: str, *, val_path: str | Path | None = None,
           **kwargs: Any) -> Any:
    """Start the job as a Ray task with declared resources; returns its ObjectRef (a dict of TuneResult)."""
    import ray

    check_name(name)
    text = Path(data_path).read_text(encoding="utf-8")
    val = Path(val_path).read_text(encoding="utf-8") if val_path is not None else None
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=2)(_remote)
    return task.remote(cfg.model_dump(mode="json"), text, val, name, kwargs)


def tune(cfg: TuneConfig, data_path: str | Path, name: str, *, screen: bool = False,
         val_path: str | Path | None = None, **kwargs: Any) -> TuneResult:
    """Submit and wait. Connects to the Ray cluster in ``RAY_ADDRESS`` if set, else starts a local one.

    With ``screen`` an ASHA screen (Ray Tune trials, see :mod:`tsugiki.tuning.screen`) picks rank, learning
    rate and layer count first; its trials and reasons go into the model card.
    """
    import ray
    from transformers import AutoTokenizer

    from tsugiki.serve.base_model import resolve_base_model

    # validate here, before any Ray work: bad data fails fast with its file:line message
    tok = AutoTokenizer.from_pretrained(resolve_base_model(cfg.model))
    data = load_jsonl(data_path, val_share=cfg.val_share, val_path=val_path, chat_template=chat_template(tok))
    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)
    if screen:
        from tsugiki.tuning.screen import screen as run_screen

        found = run_screen(cfg, data)
        cfg = found.apply(cfg)
        kwargs["screen_record"] = found.to_dict()
    return TuneResult(**ray.get(submit(cfg, data_path, name, val_path=val_path, **kwargs)))
