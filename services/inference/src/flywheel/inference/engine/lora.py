"""Many LoRA adapters in one model: per-layer slots of stacked A/B tensors (S-LoRA / vLLM).

Every target linear layer of the base model is wrapped once, at start-up, by a
``SlottedLoraLinear`` holding ``slots + 1`` preallocated LoRA pairs: ``A [S+1, r, in]``
and ``B [S+1, out, r]``, slot 0 all zeros (the base model). Loading an adapter is then a
tensor copy into a free slot (no module surgery, no re-merge, nothing recompiled), and a
batch whose rows use different adapters applies each row's adapter with one batched
gather-matmul: ``y = base(x) + (x @ A[slot]ᵀ) @ B[slot]ᵀ`` per row.

Adapters of a smaller rank are zero-padded to the slot rank, and the LoRA scale
(``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is folded into B at load time, so the
forward pass needs no per-row scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The projections of Llama-family blocks that adapters may target.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT's tensor names: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_TENSOR = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:[a-z_]+\.)?([a-z_]+)\.lora_([AB])(?:\.[^.]+)?\.weight$"
)


class AdapterLoadError(ValueError):
    """The adapter's files do not fit this model (the message says which tensor and why)."""


@dataclass
class BatchAdapters:
    """Which slot each row of the running batch uses; read by every wrapped layer.

    ``version`` changes whenever the rows' slots do; each layer then refreshes only the
    rows of its per-row copies whose slot changed (the engine keeps rows in place as far
    as it can: a leaving row is replaced by the last one), not every row every step.
    """

    rows: int = 0
    version: int = 0
    slots: list[int] = field(default_factory=list)

    def set(self, slots: list[int]) -> None:
        """Use ``slots`` (one per batch row) for the next forward passes."""
        if slots == self.slots:
            return
        self.slots = list(slots)
        self.rows = len(slots)
        self.version += 1


class SlottedLoraLinear(nn.Module):
    """A frozen linear layer plus ``slots`` LoRA pairs, one chosen per batch row.

    Pairs are stored ready for a batched matmul, ``A`` as ``[S+1, in, r]`` and ``B`` as
    ``[S+1, r, out]``. Each batch row gets its pair copied into a per-layer buffer of
    ``max_rows`` rows, kept between steps and refreshed only where a row's slot changed,
    so the forward pass is one ``bmm`` + one ``baddbmm`` whatever the adapters' mix.
    """

    def __init__(
        self, base: nn.Linear, slots: int, rank: int, batch: BatchAdapters, max_rows: int
    ) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        dtype = base.weight.dtype
        shape_a = (slots + 1, base.in_features, rank)
        shape_b = (slots + 1, rank, base.out_features)
        self.lora_a = nn.Parameter(torch.zeros(shape_a, dtype=dtype), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(shape_b, dtype=dtype), requires_grad=False)
        self.row_a = torch.zeros((max_rows, base.in_features, rank), dtype=dtype)
        self.row_b = torch.zeros((max_rows, rank, base.out_features), dtype=dtype)
        # Which slots hold a non-zero pair for this layer (adapters need not target it).
        self.active = [False] * (slots + 1)
        self._row_slots: list[int] = []
        self._version = -1
        self._in_use = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self._version != self.batch.version:
            self._refresh()
        if not self._in_use:
            return out
        rows = x.shape[0]
        # [B, T, in] @ [B, in, r] -> [B, T, r] @ [B, r, out]: each row its own adapter.
        return out.baddbmm_(torch.bmm(x, self.row_a[:rows]), self.row_b[:rows])

    def _refresh(self) -> None:
        """Copy in the pairs of rows whose slot changed since the last batch."""
        self._version = self.batch.version
        slots = self.batch.slots
        self._in_use = any(self.active[s] for s in set(slots))
        if not self._in_use:
            return
        if len(slots) > self.row_a.shape[0]:
            self._grow(len(slots))
        known = self._row_slots
        changed = [i for i, s in enumerate(slots) if i >= len(known) or known[i] != s]
        if changed:
            index = torch.tensor(changed, dtype=torch.long)
            wanted = torch.tensor([slots[i] for i in changed], dtype=torch.long)
            self.row_a.index_copy_(0, index, self.lora_a.index_select(0, wanted))
            self.row_b.index_copy_(0, index, self.lora_b.index_select(0, wanted))
        self._row_slots = list(slots)

    def _grow(self, rows: int) -> None:
        self.row_a = torch.zeros((rows, *self.row_a.shape[1:]), dtype=self.row_a.dtype)
        self.row_b = torch.zeros((rows, *self.row_b.shape[1:]), dtype=self.row_b.dtype)
        self._row_slots = []

    def fill(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put one adapter's (A, scaled B) in ``slot``; ``None`` clears it for this layer."""
        self.lora_a.data[slot].zero_()
        self.lora_b.data[slot].zero_()
        self.active[slot] = a is not None
        if a is not None and b is not None:
            rank = a.shape[0]
            self.lora_a.data[slot, :, :rank].copy_(a.T)
            self.lora_b.data[slot, :rank].copy_(b.T)
        # Rows copied from this slot are stale.
        self._row_slots = [-1 if s == slot else s for s in self._row_slots]
        self._version = -1


@dataclass
class AdapterWeights:
    """An adapter read from disk: per (layer, module) its A and its scale-folded B."""

    rank: int
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def scale_of(config: Mapping[str, Any], rank: int) -> float:
    """PEFT's LoRA scale for ``config`` (``alpha / r``; ``alpha / sqrt(r)`` with rsLoRA)."""
    alpha = float(config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_weights(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype: torch.dtype
) -> AdapterWeights:
    """Group PEFT tensors by (layer, module), fold each module's scale into B."""
    if config.get("use_dora"):
        raise AdapterLoadError("DoRA adapters are not supported")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR.search(name)
        if match is None:
            raise AdapterLoadError(f"tensor {name!r} is not a LoRA A/B weight of a decoder layer")
        layer, module, half = int(match[1]), match[2], match[3]
        halves.setdefault((layer, module), {})[half] = tensor
    default_rank = int(config.get("r", 8))
    rank_pattern: Mapping[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, float] = config.get("alpha_pattern") or {}
    weights = AdapterWeights(rank=0)
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"layer {layer} {module}: needs both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterLoadError(f"layer {layer} {module}: A has rank {rank}, B {b.shape[1]}")
        expected = _pattern_value(rank_pattern, layer, module, default_rank)
        alpha = _pattern_value(alpha_pattern, layer, module, config.get("lora_alpha", expected))
        scale = scale_of({**config, "lora_alpha": alpha}, rank)
        weights.pairs[(layer, module)] = (a.to(dtype), (b.float() * scale).to(dtype))
        weights.rank = max(weights.rank, rank)
    if not weights.pairs:
        raise AdapterLoadError("the adapter has no LoRA tensors")
    return weights


def _pattern_value(pattern: Mapping[str, Any], layer: int, module: str, default: Any) -> Any:
    """PEFT's per-module override (``rank_pattern`` / ``alpha_pattern``) for one module."""
    for key, value in pattern.items():
        if re.search(rf"(^|\.)({key})$", f"layers.{layer}.{module}") or key == module:
            return value
    return default


class LoraSlots:
    """The slot tables of a model: install once, then fill and clear slots."""

    def __init__(self, model: nn.Module, *, slots: int, rank: int, max_rows: int = 16) -> None:
        self.slots = slots
        self.rank = rank
        self.batch = BatchAdapters()
        self.layers: dict[tuple[int, str], SlottedLoraLinear] = {}
        for layer_index, block in enumerate(_decoder_layers(model)):
            for module_name, parent, child_name, child in _targets(block):
                wrapped = SlottedLoraLinear(child, slots, rank, self.batch, max_rows)
                setattr(parent, child_name, wrapped)
                self.layers[(layer_index, module_name)] = wrapped

    def check(self, weights: AdapterWeights) -> None:
        """Raise ``AdapterLoadError`` unless ``weights`` fit the slots' layers and rank."""
        if weights.rank > self.rank:
            raise AdapterLoadError(f"rank {weights.rank} exceeds --max-lora-rank {self.rank}")
        for (layer, module), (a, b) in weights.pairs.items():
            target = self.layers.get((layer, module))
            if target is None:
                raise AdapterLoadError(f"layer {layer} has no target module {module!r}")
            base = target.base
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise AdapterLoadError(
                    f"layer {layer} {module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not "
                    f"fit a {base.in_features}->{base.out_features} layer"
                )

    def fill(self, slot: int, weights: AdapterWeights | None) -> None:
        """Copy ``weights`` into ``slot`` of every layer (``None``: clear the slot)."""
        if not 1 <= slot <= self.slots:
            raise ValueError(f"slot {slot} outside 1..{self.slots}")
        for key, layer in self.layers.items():
            pair = weights.pairs.get(key) if weights is not None else None
            layer.fill(slot, *(pair if pair is not None else (None, None)))


def _decoder_layers(model: nn.Module) -> Iterator[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AdapterLoadError("only decoder models with model.layers are supported")
    yield from layers


def _targets(block: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(module name, parent, attribute, linear) for each target projection of a block."""
    for parent in block.modules():
        for child_name, child in parent.named_children():
            if child_name in TARGET_MODULES and isinstance(child, nn.Linear):
                yield child_name, parent, child_name, child
