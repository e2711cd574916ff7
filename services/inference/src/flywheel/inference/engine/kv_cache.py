"""The running batch's key/value cache, for continuous batching on transformers models.

Rows are left-padded so every row's newest token sits in the last column: a decode step
then appends one column for the whole batch. Sequences join (``merge``) and leave
(``select``) between steps; columns that became padding in every row are dropped
(``trim``). Each layer keeps spare capacity, so a decode step writes into place instead
of concatenating the whole cache again (transformers' ``DynamicLayer`` does the latter,
which makes long generations quadratic in copies).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One layer's keys and values in buffers with room to grow along the sequence."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            assert self.keys is not None
            assert self.values is not None
            return self.keys, self.values
        needed = self._length + key_states.shape[-2]
        if needed > self._k.shape[-2]:
            self._reserve(needed)
        self._k[:, :, self._length : needed] = key_states
        self._v[:, :, self._length : needed] = value_states
        self._expose(needed)
        assert self.keys is not None
        assert self.values is not None
        return self.keys, self.values

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents with ``keys``/``values`` ([batch, heads, length, dim])."""
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        length = keys.shape[-2]
        capacity = max(32, 2 * length)
        shape = (*keys.shape[:2], capacity, keys.shape[-1])
        self._k = keys.new_empty(shape)
        self._v = values.new_empty(shape)
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self._expose(length)

    def _reserve(self, needed: int) -> None:
        assert self._k is not None
        assert self._v is not None
        old_k, old_v, length = self._k, self._v, self._length
        shape = (*old_k.shape[:2], max(needed, 2 * old_k.shape[-2]), old_k.shape[-1])
        self._k, self._v = old_k.new_empty(shape), old_v.new_empty(shape)
        self._k[:, :, :length] = old_k[:, :, :length]
        self._v[:, :, :length] = old_v[:, :, :length]

    def _expose(self, length: int) -> None:
        assert self._k is not None
        assert self._v is not None
        self._length = length
        self.keys = self._k[:, :, :length]
        self.values = self._v[:, :, :length]


class BatchCache:
    """Key/value cache + padding mask + next positions of the running batch's rows."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.cache = DynamicCache()
        self.cache.layers = [GrowingLayer() for _ in range(num_layers)]
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.mask.shape[0])

    def layers(self) -> list[GrowingLayer]:
        """The cache's layers (all ``GrowingLayer``)."""
        return [layer for layer in self.cache.layers if isinstance(layer, GrowingLayer)]

    def contents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) as they are now."""
        out = []
        for layer in self.layers():
            assert layer.keys is not None
            assert layer.values is not None
            out.append((layer.keys, layer.values))
        return out

    def after_step(self) -> None:
        """Record that a decode step appended one real token to every row."""
        ones = torch.ones((self.rows, 1), dtype=torch.long)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions + 1

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order), then drop all-padding columns."""
        index = torch.tensor(keep, dtype=torch.long)
        if not keep:
            self.__init__(self.num_layers)  # type: ignore[misc]
            return
        for layer, (keys, values) in zip(self.layers(), self.contents(), strict=True):
            layer.assign(keys.index_select(0, index), values.index_select(0, index))
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        if self.rows == 0:
            return
        real = self.mask.any(dim=0).nonzero()
        first = int(real[0]) if len(real) else self.mask.shape[1]
        if first == 0:
            return
        for layer, (keys, values) in zip(self.layers(), self.contents(), strict=True):
            layer.assign(keys[:, :, first:], values[:, :, first:])
        self.mask = self.mask[:, first:]

    def merge(self, other: BatchCache) -> None:
        """Append ``other``'s rows after this batch's, left-padding the shorter one."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.positions = other.cache, other.mask, other.positions
            return
        length = max(self.mask.shape[1], other.mask.shape[1])
        merged = []
        for (k1, v1), (k2, v2) in zip(self.contents(), other.contents(), strict=True):
            keys = torch.cat([_left_pad(k1, length), _left_pad(k2, length)], dim=0)
            values = torch.cat([_left_pad(v1, length), _left_pad(v2, length)], dim=0)
            merged.append((keys, values))
        for layer, (keys, values) in zip(self.layers(), merged, strict=True):
            layer.assign(keys, values)
        self.mask = torch.cat(
            [_left_pad_mask(self.mask, length), _left_pad_mask(other.mask, length)]
        )
        self.positions = torch.cat([self.positions, other.positions])


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    if missing == 0:
        return states
    pad = states.new_zeros((*states.shape[:2], missing, states.shape[-1]))
    return torch.cat([pad, states], dim=-2)


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
