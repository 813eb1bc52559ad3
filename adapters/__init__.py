"""Adapters: the PEFT LoRA artifact format, the versioned on-disk store, and the per-replica LRU cache."""

from tsugiki.adapters.format import AdapterRef, LoraWeights, read_lora_artifact
from tsugiki.adapters.store import AdapterRecord, AdapterStore

__all__ = ["AdapterRef", "LoraWeights", "read_lora_artifact", "AdapterRecord", "AdapterStore"]
