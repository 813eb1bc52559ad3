"""Multi-LoRA linear layers: one batched forward pass serves rows that use different adapters.

Every adaptable ``nn.Linear`` of the base model is wrapped in :class:`MultiLoRALinear`, which keeps each
resident adapter's weights in dicts keyed by adapter key (the PEFT habit: adding or removing an adapter is a
dict insert or delete). Which row uses which adapter is per-batch metadata in :class:`LoRABatch`, set by the
engine before each forward pass (vLLM's punica wrapper does the same); nothing global is flipped per request.

Semantics for row ``i`` using adapter ``a`` (``None`` = bare base model)::

    y[i] = x[i] @ W.T (+ bias) + scaling[a] * (x[i] @ A[a].T) @ B[a].T

Implementation: for the adapters present in the batch the layer concatenates ``A`` along the rank axis
(``A_cat: [in, R]``) and the scaled ``B`` (``B_cat: [R, out]``), then computes ``y += ((x @ A_cat) * mask) @ B_cat``
where ``mask[i, c]`` is 1 when column ``c`` belongs to row ``i``'s adapter. That is three dense ops per layer
whatever the number of distinct adapters; the concatenation and mask are rebuilt only when the batch's
composition changes (not every decode step), so a steady decode batch pays only the three ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LoRABatch:
    """Per-forward metadata: the adapter key of every row. Shared by all layers of one model."""

    def __init__(self) -> None:
        self.version = 0
        self.row_keys: tuple[str | None, ...] = ()
        self.keys: tuple[str, ...] = ()
        self.row_index = torch.empty(0, dtype=torch.long)

    def set(self, row_keys: Sequence[str | None]) -> None:
        """Declare the adapter key of each row for the next forward passes (no-op if unchanged)."""
        row_keys = tuple(row_keys)
        if row_keys == self.row_keys:
            return
        self.row_keys = row_keys
        self.keys = tuple(dict.fromkeys(k for k in row_keys if k is not None))
        pos = {k: i for i, k in enumerate(self.keys)}
        self.row_index = torch.tensor([pos[k] if k is not None else -1 for k in row_keys], dtype=torch.long)
        self.version += 1


class MultiLoRALinear(nn.Module):
    """A linear layer plus any number of resident LoRA adapters, applied per row.

    Args:
        base_layer: the frozen base ``nn.Linear`` (kept as ``.base_layer``, as PEFT names it).
        batch: the model-wide :class:`LoRABatch`.
    """

    def __init__(self, base_layer: nn.Linear, batch: LoRABatch) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._batch = batch
        self.lora_A: dict[str, torch.Tensor] = {}  # key -> [in, r]
        self.lora_B: dict[str, torch.Tensor] = {}  # key -> [r, out], scaling folded in
        self._weights_version = 0
        self._plan_for: tuple[int, int] = (-1, -1)
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def add_adapter(self, key: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Install adapter ``key`` with ``A: [r, in]``, ``B: [out, r]`` (PEFT's layout)."""
        w = self.base_layer.weight
        self.lora_A[key] = a.t().to(device=w.device, dtype=w.dtype).contiguous()
        self.lora_B[key] = (b.t() * scaling).to(device=w.device, dtype=w.dtype).contiguous()
        self._weights_version += 1

    def remove_adapter(self, key: str) -> None:
        if self.lora_A.pop(key, None) is not None:
            self.lora_B.pop(key, None)
            self._weights_version += 1

    def _build_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        batch = self._batch
        present = [(i, k) for i, k in enumerate(batch.keys) if k in self.lora_A]
        if not present:
            return None
        a_cat = torch.cat([self.lora_A[k] for _, k in present], dim=1)
        b_cat = torch.cat([self.lora_B[k] for _, k in present], dim=0)
        col_owner = torch.cat([torch.full((self.lora_A[k].shape[1],), i, dtype=torch.long) for i, k in present])
        row_index = batch.row_index
        if len(present) == 1 and bool((row_index == present[0][0]).all()):
            return a_cat, b_cat, None  # every row uses the one adapter: no mask needed
        mask = (row_index[:, None] == col_owner[None, :]).to(device=a_cat.device, dtype=a_cat.dtype)
        return a_cat, b_cat, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.lora_A or not self._batch.keys:
            return y
        stamp = (self._batch.version, self._weights_version)
        if stamp != self._plan_for:
            self._plan, self._plan_for = self._build_plan(), stamp
        if self._plan is None:
            return y
        a_cat, b_cat, mask = self._plan
        h = x @ a_cat  # [N, (T,) R]
        if mask is not None:
            h = h * (mask if h.dim() == 2 else mask[:, None, :])
        return y + h @ b_cat


def adaptable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers adapters may target: every ``nn.Linear`` except the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not isinstance(m, MultiLoRALinear)}


def inject_multi_lora(model: nn.Module) -> tuple[LoRABatch, dict[str, MultiLoRALinear]]:
    """Wrap every adaptable linear layer of ``model`` in place; return the shared batch and the layers by name."""
    batch = LoRABatch()
    layers: dict[str, MultiLoRALinear] = {}
    for name, linear in adaptable_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoRALinear(linear, batch)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return batch, layers
