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

    ``version`` changes whenever the rows' slots do, so layers recompute what depends on
    them once per batch composition, not once per decode step. ``mask`` selects, per row,
    the rank columns of its slot among slots ``1..last`` (one-row steps use it).
    """

    rank: int
    rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    last: int = 0
    version: int = 0
    slots: list[int] = field(default_factory=list)

    def set(self, slots: list[int]) -> None:
        """Use ``slots`` (one per batch row) for the next forward passes."""
        if slots == self.slots:
            return  # unchanged batch: layers keep what they derived from it
        self.slots = list(slots)
        self.version += 1
        if not any(slots):
            self.rows, self.mask, self.last = None, None, 0
            return
        self.rows = torch.tensor(slots, dtype=torch.long)
        self.last = max(slots)
        columns = torch.arange(self.last * self.rank) // self.rank + 1
        self.mask = (columns[None, :] == self.rows[:, None]).unsqueeze(1)


class SlottedLoraLinear(nn.Module):
    """A frozen linear layer plus ``slots`` LoRA pairs, one chosen per batch row.

    The pairs are stored side by side along the rank: ``a`` is ``[in, (S+1) r]`` and ``b``
    ``[(S+1) r, out]``, slot ``s`` in columns (rows of ``b``) ``s r .. (s+1) r``. A decode
    step (one token per row) then needs no per-row copies at all: one matmul projects every
    row onto every slot in use, a mask keeps each row's own slot, one matmul expands, so
    each adapter's weights are read once per step however many rows use it. A prefill (many
    tokens per row) instead gathers each row's pair and multiplies only by it, since there
    the extra columns would cost real FLOPs.
    """

    def __init__(self, base: nn.Linear, slots: int, rank: int, batch: BatchAdapters) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.rank = rank
        dtype = base.weight.dtype
        width = (slots + 1) * rank
        self.lora_a = nn.Parameter(torch.zeros((base.in_features, width), dtype=dtype), False)
        self.lora_b = nn.Parameter(torch.zeros((width, base.out_features), dtype=dtype), False)
        # Which slots hold a non-zero pair for this layer (adapters need not target it).
        self.active = [False] * (slots + 1)
        self._cached_version = -1
        self._in_use = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if not self._batch_uses_me():
            return out
        rows, r = self.batch.rows, self.rank
        assert rows is not None
        if x.shape[1] == 1 and self.batch.mask is not None:
            columns = slice(r, (self.batch.last + 1) * r)
            h = x @ self.lora_a[:, columns]
            h = h * self.batch.mask.to(h.dtype)
            return out.add_(h @ self.lora_b[columns])
        slots = self.lora_a.shape[1] // r
        a = self.lora_a.view(-1, slots, r).index_select(1, rows).transpose(0, 1)
        b = self.lora_b.view(slots, r, -1).index_select(0, rows)
        # [B, T, in] @ [B, in, r] -> [B, T, r] @ [B, r, out]: each row its own adapter.
        return out.baddbmm_(torch.bmm(x, a), b)

    def _batch_uses_me(self) -> bool:
        """Whether a row of the batch uses a slot with a pair for this layer."""
        if self._cached_version != self.batch.version:
            self._cached_version = self.batch.version
            self._in_use = any(self.active[s] for s in set(self.batch.slots))
        return self._in_use

    def fill(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put one adapter's (A, scaled B) in ``slot``; ``None`` clears it for this layer."""
        columns = slice(slot * self.rank, (slot + 1) * self.rank)
        self.lora_a.data[:, columns].zero_()
        self.lora_b.data[columns].zero_()
        self.active[slot] = a is not None
        if a is not None and b is not None:
            rank = a.shape[0]
            start = slot * self.rank
            self.lora_a.data[:, start : start + rank].copy_(a.T)
            self.lora_b.data[start : start + rank].copy_(b.T)
        self._cached_version = -1


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

    def __init__(self, model: nn.Module, *, slots: int, rank: int) -> None:
        self.slots = slots
        self.rank = rank
        self.batch = BatchAdapters(rank=rank)
        self.layers: dict[tuple[int, str], SlottedLoraLinear] = {}
        for layer_index, block in enumerate(_decoder_layers(model)):
            for module_name, parent, child_name, child in _targets(block):
                wrapped = SlottedLoraLinear(child, slots, rank, self.batch)
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
