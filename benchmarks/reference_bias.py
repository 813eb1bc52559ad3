"""Is an adapter's shipped drift reference (its training prompts' features) biased against unseen prompts?

The tuning job fits the adapter on the very prompts whose features become its drift reference
(monitoring/reference.py). If fitting pulled those features together, unseen queries of the same distribution
would look novel and the detector would alarm more often than its ERT says. This scores the held-out CLINC150
test queries of the adapter's own intents (from the subset shipped in tests/data/clinc150) against the
reference, over 10 random profile splits, with the adapter on and (control: no fitting possible) off:

    python benchmarks/reference_bias.py ~/.cache/tsugiki/demo/work/v1     # the demo's v1, after `tsugiki demo`

A mean standardised novelty z near 0 (sd of one split's mean over n queries: about 1/sqrt(n)) means no bias.
The same holds for the CUSUM's increment, novelty and mean-shift score together (monitoring/drift.py), with the
test queries streamed in a random order per split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tsugiki.config import ModelConfig
from tsugiki.monitoring.drift import DriftConfig, DriftDetector, ReferenceProfile
from tsugiki.monitoring.reference import prompt_features, read_reference
from tsugiki.serve.base_model import load_base_model, set_torch_threads
from tsugiki.tuning.data import label_prompt

SUBSET = Path(__file__).resolve().parents[1] / "tests" / "data" / "clinc150" / "subset.json"


def main() -> None:
    from peft import PeftModel

    adapter = Path(sys.argv[1]).expanduser()
    print(f"torch threads {set_torch_threads(2)}", flush=True)
    loaded = load_base_model(ModelConfig(), progress=True)
    labels = set(json.loads((adapter / "model_card.json").read_text())["labels"])
    sub = json.loads(SUBSET.read_text())
    train = [label_prompt(t) for t, i in sub["train"] + sub["val"] if i in labels]
    test = [label_prompt(t) for t, i in sub["test"] if i in labels]
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    found = read_reference(adapter, base_fingerprint=loaded.info.fingerprint, dtype=str(model.dtype))
    if found is None:
        raise SystemExit(f"{adapter} ships no usable drift reference (see the warning above)")
    ref, source = found
    cfg = DriftConfig()

    def mean_z(reference: np.ndarray, live: np.ndarray) -> tuple[list[float], list[float]]:
        """Per split: (mean novelty z, mean CUSUM increment with the mean-shift score)."""
        novelty, combined = [], []
        for s in range(10):
            prof = ReferenceProfile.fit(reference, n_components=cfg.n_components, n_neighbors=cfg.n_neighbors,
                                        seed=s)
            stream = live[np.random.default_rng(s).permutation(len(live))]
            novelty.append(float(prof.z(stream).mean()))
            det = DriftDetector(config=cfg, profile=prof)
            combined.append(float(det.update(stream).z.mean()))  # what the server's CUSUM adds up
        return novelty, combined

    on = mean_z(ref, prompt_features(model, loaded.tokenizer, test, batch_size=32))
    with model.disable_adapter():
        off = mean_z(prompt_features(model, loaded.tokenizer, train, batch_size=32),
                     prompt_features(model, loaded.tokenizer, test, batch_size=32))
    print(f"reference: {source}; {len(test)} unseen test queries of its {len(labels)} intents; "
          f"sd of one split's mean under no bias ~{1 / np.sqrt(len(test)):.3f}")
    for name, i in (("novelty z", 0), ("CUSUM increment (novelty + mean shift)", 1)):
        print(f"mean {name}, adapter on (the shipped reference): {np.mean(on[i]):+.3f}  "
              f"(splits: {np.round(on[i], 3).tolist()})")
        print(f"mean {name}, adapter off (control, base features): {np.mean(off[i]):+.3f}  "
              f"(splits: {np.round(off[i], 3).tolist()})")


if __name__ == "__main__":
    main()
