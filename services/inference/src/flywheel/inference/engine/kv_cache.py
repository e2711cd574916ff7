"""The running batch's key/value cache, for continuous batching on transformers models.

Rows are left-padded so every row's newest token sits in the last column: a decode step
then appends one column for the whole batch. Buffers have spare room in both the batch
and the sequence dimension, so the frequent changes cost little:

- a decode step writes its column in place (transformers' ``DynamicLayer`` concatenates
  the whole cache each step, which makes long generations quadratic in copies);
- joining sequences are written into free rows, right-aligned to the batch's columns,
  when they are no longer than it (else the batch is laid out again);
- a leaving sequence is replaced by the last row (swap-remove), one row copied rather
  than the whole batch. Row order is therefore not kept: ``remove`` returns the moves so
  the engine's own per-row state follows the same permutation.

Columns that became padding in every row are dropped only once they are half the cache
(each drop copies everything).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One layer's keys and values in buffers with room to grow in rows and columns."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._rows = 0
        self._length = 0

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold without reallocating."""
        if self._k is None:
            return 0, 0
        return int(self._k.shape[0]), int(self._k.shape[2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states, key_states.shape[0])
        else:
            needed = self._length + key_states.shape[-2]
            if needed > self._k.shape[2]:
                self._reserve(self._k.shape[0], max(needed, 2 * self._k.shape[2]))
            rows = self._rows
            self._k[:rows, :, self._length : needed] = key_states
            self._v[:rows, :, self._length : needed] = value_states
            self._expose(rows, needed)
        return self._views()

    def assign(self, keys: torch.Tensor, values: torch.Tensor, row_capacity: int) -> None:
        """Replace the contents with ``keys``/``values`` ([rows, heads, length, dim])."""
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        rows, length = keys.shape[0], keys.shape[-2]
        shape = (max(row_capacity, rows), keys.shape[1], max(32, 2 * length), keys.shape[-1])
        self._k = keys.new_zeros(shape)
        self._v = values.new_zeros(shape)
        self._k[:rows, :, :length] = keys
        self._v[:rows, :, :length] = values
        self._expose(rows, length)

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Write shorter-or-equal rows right-aligned into free rows; False if they don't fit."""
        if self._k is None or self._v is None:
            return False
        count, length = keys.shape[0], keys.shape[-2]
        start = self._rows
        if start + count > self._k.shape[0] or length > self._length:
            return False
        self._k[start : start + count, :, : self._length - length] = 0
        self._v[start : start + count, :, : self._length - length] = 0
        self._k[start : start + count, :, self._length - length : self._length] = keys
        self._v[start : start + count, :, self._length - length : self._length] = values
        self._expose(start + count, self._length)
        return True

    def move_row(self, source: int, target: int) -> None:
        """Copy row ``source`` over row ``target``."""
        assert self._k is not None
        assert self._v is not None
        self._k[target, :, : self._length] = self._k[source, :, : self._length]
        self._v[target, :, : self._length] = self._v[source, :, : self._length]

    def truncate_rows(self, rows: int) -> None:
        """Keep the first ``rows`` rows."""
        self._expose(rows, self._length)

    def drop_columns(self, first: int) -> None:
        """Drop the first ``first`` columns of every row."""
        assert self._k is not None
        assert self._v is not None
        keys = self._k[: self._rows, :, first : self._length].clone()
        values = self._v[: self._rows, :, first : self._length].clone()
        self.assign(keys, values, self._k.shape[0])

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values as they are now."""
        return self._views()

    def _reserve(self, rows: int, columns: int) -> None:
        assert self._k is not None
        assert self._v is not None
        old_k, old_v = self._k, self._v
        shape = (rows, old_k.shape[1], columns, old_k.shape[-1])
        self._k, self._v = old_k.new_zeros(shape), old_v.new_zeros(shape)
        self._k[: self._rows, :, : self._length] = old_k[: self._rows, :, : self._length]
        self._v[: self._rows, :, : self._length] = old_v[: self._rows, :, : self._length]

    def _expose(self, rows: int, length: int) -> None:
        assert self._k is not None
        assert self._v is not None
        self._rows, self._length = rows, length
        self.keys = self._k[:rows, :, :length]
        self.values = self._v[:rows, :, :length]

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None
        assert self.values is not None
        return self.keys, self.values


class BatchCache:
    """Key/value cache + padding mask + next positions of the running batch's rows."""

    def __init__(self, num_layers: int, row_capacity: int = 1) -> None:
        self.num_layers = num_layers
        self.row_capacity = row_capacity
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

    def after_step(self) -> None:
        """Record that a decode step appended one real token to every row."""
        ones = torch.ones((self.rows, 1), dtype=torch.long)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions + 1

    def replicate(self, rows: list[int]) -> None:
        """Lay the batch out again as rows ``rows`` of it (repeats allowed), in that order."""
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self.layers():
            keys, values = layer.contents()
            capacity = max(self.row_capacity, len(rows))
            layer.assign(keys.index_select(0, index), values.index_select(0, index), capacity)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def remove(self, rows: list[int]) -> list[tuple[int, int]]:
        """Remove ``rows``, filling each hole with the current last row.

        Returns the moves ``(source, target)`` in the order made, so callers can permute
        their own per-row lists alike.
        """
        moves: list[tuple[int, int]] = []
        count = self.rows
        for row in sorted(rows, reverse=True):
            last = count - 1
            if row != last:
                for layer in self.layers():
                    layer.move_row(last, row)
                self.mask[row] = self.mask[last]
                self.positions[row] = self.positions[last]
                moves.append((last, row))
            count -= 1
        for layer in self.layers():
            layer.truncate_rows(count)
        self.mask = self.mask[:count]
        self.positions = self.positions[:count]
        if count == 0:
            self.__init__(self.num_layers, self.row_capacity)  # type: ignore[misc]
        else:
            self._trim()
        return moves

    def merge(self, other: BatchCache) -> None:
        """Append ``other``'s rows after this batch's (left-padded to a common length)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.positions = other.cache, other.mask, other.positions
            self._with_capacity()
            return
        length = self.mask.shape[1]
        incoming = [layer.contents() for layer in other.layers()]
        if other.mask.shape[1] <= length and all(
            layer.append_rows(k, v) for layer, (k, v) in zip(self.layers(), incoming, strict=True)
        ):
            self.mask = torch.cat([self.mask, _left_pad_mask(other.mask, length)])
        else:
            self._relayout(other, incoming)
        self.positions = torch.cat([self.positions, other.positions])

    def _relayout(
        self, other: BatchCache, incoming: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])
        capacity = max(self.row_capacity, self.rows + other.rows)
        for layer, (k2, v2) in zip(self.layers(), incoming, strict=True):
            k1, v1 = layer.contents()
            keys = torch.cat([_left_pad(k1, length), _left_pad(k2, length)], dim=0)
            values = torch.cat([_left_pad(v1, length), _left_pad(v2, length)], dim=0)
            layer.assign(keys, values, capacity)
        self.mask = torch.cat(
            [_left_pad_mask(self.mask, length), _left_pad_mask(other.mask, length)]
        )

    def _with_capacity(self) -> None:
        """Give a batch taken over from a prefill the engine's row capacity."""
        for layer in self.layers():
            if layer.capacity[0] < self.row_capacity:
                keys, values = layer.contents()
                layer.assign(keys, values, self.row_capacity)

    def _trim(self) -> None:
        """Drop leading all-padding columns once they are half the cache."""
        real = self.mask.any(dim=0).nonzero()
        first = int(real[0]) if len(real) else self.mask.shape[1]
        if first == 0 or 2 * first < self.mask.shape[1]:
            return
        for layer in self.layers():
            layer.drop_columns(first)
        self.mask = self.mask[:, first:]


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
