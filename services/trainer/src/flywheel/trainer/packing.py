"""Padding-free, prefix-shared forward passes for TRL's SFT and DPO trainers.

TRL pads each batch to its longest row, and DPO stacks every pair as two rows (prompt +
chosen, prompt + rejected), so on data of varied lengths a third or more of the matmul
work is padding, and the shared prompt is processed twice. On a CPU (and for small
models on a GPU) the work is the matmuls, so that is time thrown away.

Here the collator's padded batch is kept as TRL built it (every loss, metric and
token count reads it unchanged) and a `Packing` plan is added to it: the batch's real
tokens laid end to end in one row, each DPO pair as ``shared prefix + chosen suffix +
rejected suffix``, with position ids restarting per sequence (the rejected suffix
continues from the end of the shared prefix). The model's backbone runs on that row
only, attention restricted to each sequence (the rejected suffix sees the prefix, not
the chosen suffix) by `segment_attention`, and its hidden states are gathered back into
the padded layout before TRL's LM head. Every real token sees exactly the tokens it
sees in the padded batch, at the same positions, so the result is the same up to
floating-point summation order; gradients through the shared prefix add up from both
rows, as they would.

Only models whose attention goes through transformers' attention interface with plain
causal attention (no sliding window) take the plan; anything else trains as before.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from trl import SFTTrainer
from trl.trainer import utils as trl_utils

from flywheel.trainer.ref_cache import CachedReferenceDPOTrainer

ATTENTION = "flywheel_segments"
# Architectures checked to route attention through the interface with position-id RoPE
# and plain causal attention (sliding windows are refused below).
MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
# Set while a packed forward runs, so the mask builder skips the (tokens x tokens) mask
# that the segments make unnecessary.
_PACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("flywheel_packed", default=False)
# Set while the model's forward runs on a packed batch: TRL's fused LM head then scores
# only the positions with a label (its GPU path) instead of every padded position, which
# it does elsewhere only to keep tile shapes fixed for compilers (no concern in eager).
_COMPACT_HEAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flywheel_compact_head", default=False
)


@dataclass
class Segments:
    """The packed row cut into sequences for attention: ``index[s, j]`` is the packed
    position of sequence ``s``'s ``j``-th token (repeated past its end), ``mask`` which
    keys each query may see, ``inverse[t]`` where packed token ``t`` sits in the
    ``(sequence, offset)`` grid, flattened."""

    index: torch.Tensor  # (S, Lmax) long
    mask: torch.Tensor  # (S, 1, Lmax, Lmax) bool
    inverse: torch.Tensor  # (T,) long

    def to(self, device: torch.device) -> Segments:
        return Segments(self.index.to(device), self.mask.to(device), self.inverse.to(device))


@dataclass
class Packing:
    """A padded batch's real tokens in one row, and how to get the padded layout back."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    segments: Segments
    gather: torch.Tensor  # (rows * length,) packed position of each padded position
    rows: int
    length: int

    def to(self, device: torch.device) -> Packing:
        return Packing(
            self.input_ids.to(device), self.position_ids.to(device), self.segments.to(device),
            self.gather.to(device), self.rows, self.length,
        )  # fmt: skip


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0, 0]) if len(differs) else n


def plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, paired: bool) -> Packing:
    """The packing of a right-padded batch. ``paired``: rows ``i`` and ``i + rows/2`` are a
    preference pair (TRL's layout), laid out once as their common prefix and two suffixes."""
    rows, length = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    groups = (
        [(i, i + rows // 2) for i in range(rows // 2)] if paired else [(i,) for i in range(rows)]
    )
    ids: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    gather = torch.zeros(rows * length, dtype=torch.long)
    sizes: list[int] = []
    masks: list[torch.Tensor] = []
    offset = 0
    for group in groups:
        first = group[0]
        n = lengths[first]
        ids.append(input_ids[first, :n])
        positions.append(torch.arange(n))
        gather[first * length : first * length + n] = torch.arange(offset, offset + n)
        size = n
        if len(group) == 2:
            second = group[1]
            m = lengths[second]
            shared = _common_prefix(input_ids[first, :n], input_ids[second, :m])
            ids.append(input_ids[second, shared:m])
            positions.append(torch.arange(shared, m))
            base = second * length
            gather[base : base + shared] = torch.arange(offset, offset + shared)
            gather[base + shared : base + m] = torch.arange(offset + n, offset + n + m - shared)
            size = n + m - shared
        mask = torch.ones(size, size, dtype=torch.bool).tril()
        if len(group) == 2:
            # The second suffix sees the shared prefix and itself, never the first suffix.
            mask[n:, shared:n] = False
        masks.append(mask)
        sizes.append(size)
        offset += size
    longest = max(sizes)
    index = torch.zeros(len(groups), longest, dtype=torch.long)
    grid = torch.zeros(len(groups), 1, longest, longest, dtype=torch.bool)
    # Padding queries attend to themselves only: a fully masked row would give NaNs that
    # reach the gradients of real tokens through the backward matmuls.
    grid[:, 0] = torch.eye(longest, dtype=torch.bool)
    inverse: list[torch.Tensor] = []
    start = 0
    for s, (size, mask) in enumerate(zip(sizes, masks, strict=True)):
        index[s] = start + torch.arange(longest).clamp(max=size - 1)
        grid[s, 0, :size, :size] = mask
        inverse.append(s * longest + torch.arange(size))
        start += size
    return Packing(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(positions)[None],
        segments=Segments(index, grid, torch.cat(inverse)),
        gather=gather,
        rows=rows,
        length=length,
    )


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (what the packing assumes)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()) and bool(
        (attention_mask.sum(dim=1) > 0).all()
    )


@dataclass
class PackingCollator:
    """TRL's collator, plus the `Packing` of each batch it makes (under ``"packing"``)."""

    inner: Callable[..., dict[str, Any]]
    paired: bool

    def __call__(self, examples: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        batch = self.inner(examples, *args, **kwargs)
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if (
            isinstance(mask, torch.Tensor)
            and isinstance(ids, torch.Tensor)
            and mask.dim() == 2
            and mask.shape == ids.shape
            and (not self.paired or ids.size(0) % 2 == 0)
            and _right_padded(mask)
        ):
            batch["packing"] = plan(ids, mask, paired=self.paired)
        return batch


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: Segments | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA over each packed sequence on its own (one batched call); plain SDPA without
    segments."""
    if segments is None:
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    heads, head_dim = query.shape[1], query.shape[3]
    # (1, H, T, D) -> (S, H, Lmax, D)
    q, k, v = (x[0][:, segments.index].transpose(0, 1) for x in (query, key, value))
    attended = F.scaled_dot_product_attention(
        q, k, v, attn_mask=segments.mask, dropout_p=dropout, scale=scaling
    )
    # (S, H, Lmax, D) -> (T, H, D), the layout SDPA's wrapper returns: (batch, T, H, D)
    flat = attended.transpose(1, 2).reshape(-1, heads, head_dim)
    return flat[segments.inverse][None], None


def _segment_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    if _PACKED.get():
        return None
    mask: torch.Tensor | None = sdpa_mask(*args, **kwargs)
    return mask


AttentionInterface.register(ATTENTION, segment_attention)
AttentionMaskInterface.register(ATTENTION, _segment_mask)
_head_on_triton = trl_utils._use_triton


def _compact_head(device: torch.device) -> bool:
    return _COMPACT_HEAD.get() or bool(_head_on_triton(device))


# TRL's fused head reads this name from its module on every call; outside a packed
# forward the answer is TRL's own.
trl_utils._use_triton = _compact_head


def _backbone(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "base_model", None), base


def supports_packing(model: Any) -> bool:
    """Whether ``model``'s attention can run on packed segments."""
    backbone, base = _backbone(model)
    config = getattr(base, "config", None)
    if backbone is None or backbone is base or config is None:
        return False
    return (
        config.model_type in MODEL_TYPES
        and config._attn_implementation in ("sdpa", ATTENTION)
        and not getattr(config, "sliding_window", None)
        and not getattr(config, "use_sliding_window", False)
    )


def enable_packing(model: Any) -> bool:
    """Make ``model``'s backbone run packed batches (idempotent); False if it cannot."""
    if not supports_packing(model):
        return False
    backbone, base = _backbone(model)
    if getattr(backbone, "_flywheel_packing", False):
        return True
    base.set_attn_implementation(ATTENTION)
    original = backbone.forward

    @functools.wraps(original)
    def forward(*args: Any, packing: Packing | None = None, **kwargs: Any) -> Any:
        if packing is None or args or kwargs.get("inputs_embeds") is not None:
            return original(*args, **kwargs)
        device = kwargs["input_ids"].device
        packed = packing.to(device)
        for name in ("input_ids", "attention_mask", "position_ids"):
            kwargs.pop(name, None)
        token = _PACKED.set(True)
        try:
            out = original(
                input_ids=packed.input_ids, position_ids=packed.position_ids,
                attention_mask=None, segments=packed.segments, **kwargs,
            )  # fmt: skip
        finally:
            _PACKED.reset(token)
        hidden = out.last_hidden_state[0]
        padded = hidden[packed.gather].view(packed.rows, packed.length, hidden.size(-1))
        return BaseModelOutputWithPast(last_hidden_state=padded)

    head_forward = base.forward

    @functools.wraps(head_forward)
    def head(*args: Any, packing: Packing | None = None, **kwargs: Any) -> Any:
        if packing is None:
            return head_forward(*args, **kwargs)
        token = _COMPACT_HEAD.set(True)
        try:
            return head_forward(*args, packing=packing, **kwargs)
        finally:
            _COMPACT_HEAD.reset(token)

    backbone.forward = forward
    base.forward = head
    backbone._flywheel_packing = True
    return True


def _install(trainer: Any, *, paired: bool) -> None:
    if not isinstance(trainer.data_collator, PackingCollator) and enable_packing(trainer.model):
        trainer.data_collator = PackingCollator(trainer.data_collator, paired=paired)


class PackedSFTTrainer(SFTTrainer):  # type: ignore[misc]  # TRL is untyped
    """TRL's SFT trainer with padding-free forward passes (same batches, same loss)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.padding_free:  # TRL's own padding-free batches are one row already
            _install(self, paired=False)


class PackedDPOTrainer(CachedReferenceDPOTrainer):
    """TRL's DPO trainer (with the reference cache) whose pairs run padding-free with the
    prompt once, for training and for the reference log-probs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _install(self, paired=True)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        # TRL precomputes inside its __init__, after the collator and model exist.
        _install(self, paired=True)
        return super()._precompute_ref_logps(dataset, name, batch_size)
