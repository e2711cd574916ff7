"""Reference log-probs of DPO-family runs, computed once per (base weights, parent
adapter, data) and kept in the artifact store.

The reference forward over the whole dataset is a fixed cost of every DPO run and
retry; the result depends only on the reference policy and the data, so a rerun, a
retry or a hyperparameter sweep over the same snapshot reads it back instead. TRL
computes it in ``_precompute_ref_logps``; `CachedReferenceDPOTrainer` wraps that one method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from trl import DPOTrainer

from flywheel.core.artifacts import ArtifactStore

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass(frozen=True)
class ReferenceCache:
    """Where one run's reference log-probs are cached: the store and the run's key (the
    fingerprint of the reference policy, the data and the settings that shape it)."""

    store: ArtifactStore
    key: str

    def artifact_key(self, split: str) -> str:
        return f"cache/ref-logps/{self.key}/{split}.safetensors"

    def load(self, split: str, rows: int) -> dict[str, torch.Tensor] | None:
        """Cached log-probs of ``split``, if present and of the right length."""
        key = self.artifact_key(split)
        if not self.store.exists(key):
            return None
        with self.store.open(key) as f:
            tensors = load_tensors(f.read())
        if any(tensors[c].shape != (rows,) for c in COLUMNS):
            return None
        return tensors

    def save(self, split: str, dataset: Dataset) -> None:
        tensors = {c: torch.tensor(dataset[c], dtype=torch.float32) for c in COLUMNS}
        self.store.put_bytes(self.artifact_key(split), save_tensors(tensors))


class CachedReferenceDPOTrainer(DPOTrainer):  # type: ignore[misc]  # TRL is untyped
    """TRL's DPO trainer whose precomputed reference log-probs go through a `ReferenceCache`."""

    def __init__(
        self, *args: Any, reference_cache: ReferenceCache | None = None, **kwargs: Any
    ) -> None:
        # Set before TRL's __init__, which precomputes.
        self.reference_cache = reference_cache
        self.reference_cache_hits = 0
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        cache = self.reference_cache
        if cache is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        cached = cache.load(name, len(dataset))
        if cached is not None:
            self.reference_cache_hits += 1
            for column in COLUMNS:
                dataset = dataset.add_column(column, cached[column].tolist())
            return dataset
        computed: Dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        cache.save(name, computed)
        return computed
