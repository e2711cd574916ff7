"""Settings of the dataset service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from pathlib import Path

from flywheel.core.config import ServiceSettings
from flywheel.dataset.options import BuildOptions


class DatasetSettings(ServiceSettings):
    """The dataset service's settings; defaults give it its own ports on one machine."""

    service_name: str = "dataset"
    grpc_port: int = 50053
    metrics_port: int = 9103

    # Build defaults, for every option a SnapshotSpec leaves unset.
    dataset_tokenizer: str = ""
    # Folders whose tokenizers a spec may name by path (besides the artifact store).
    dataset_tokenizer_dirs: list[Path] = []
    dataset_sft_min_rating: int = 4
    dataset_min_rating_chosen: int = 4
    dataset_max_rating_rejected: int = 2
    dataset_min_rating_margin: int = 1
    dataset_max_prompt_tokens: int = 1024
    dataset_max_completion_tokens: int = 1024
    dataset_near_duplicate_threshold: float = 0.9
    dataset_human_weight: float = 1.0
    dataset_synthetic_weight: float = 0.5
    dataset_eval_fraction: float = 0.1

    # The trigger policy of every tenant and task that has not set its own.
    policy_enabled: bool = True
    policy_min_new_examples: int = 50
    # Seconds; 0: never trigger by time alone.
    policy_max_interval_s: int = 0
    policy_cooldown_s: int = 600
    policy_min_preference_pairs: int = 20
    policy_base_model: str = ""
    # How often policies with a max interval are looked at, in seconds.
    policy_tick_s: float = 30.0

    def build_defaults(self) -> BuildOptions:
        """The options a spec's unset fields take."""
        return BuildOptions(
            tokenizer=self.dataset_tokenizer,
            sft_min_rating=self.dataset_sft_min_rating,
            min_rating_chosen=self.dataset_min_rating_chosen,
            max_rating_rejected=self.dataset_max_rating_rejected,
            min_rating_margin=self.dataset_min_rating_margin,
            max_prompt_tokens=self.dataset_max_prompt_tokens,
            max_completion_tokens=self.dataset_max_completion_tokens,
            near_duplicate_threshold=self.dataset_near_duplicate_threshold,
            human_weight=self.dataset_human_weight,
            synthetic_weight=self.dataset_synthetic_weight,
            eval_fraction=self.dataset_eval_fraction,
        )
