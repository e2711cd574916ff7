"""Topic and event-type names: the public vocabulary other teams subscribe to."""

from __future__ import annotations

from enum import StrEnum


class Topic(StrEnum):
    """Kafka topics, ``flywheel.<entity>.v1``; the record key is the tenant."""

    FEEDBACK = "flywheel.feedback.v1"
    GENERATIONS = "flywheel.generations.v1"
    DATASETS = "flywheel.datasets.v1"
    TRAINING = "flywheel.training.v1"
    ADAPTERS = "flywheel.adapters.v1"


class EventType(StrEnum):
    """``<entity>.<past-tense verb>``: what happened, carried in the envelope's ``type``.

    The source of truth is the ``event`` option on each payload message in ``proto/``;
    this enum mirrors it for code that switches on types (a test keeps the two equal).
    """

    FEEDBACK_RECORDED = "feedback.recorded"
    FEEDBACK_EDITED = "feedback.edited"
    FEEDBACK_RETRACTED = "feedback.retracted"
    GENERATION_LOGGED = "generation.logged"
    DATASET_SNAPSHOT_CREATED = "dataset.snapshot_created"
    TRAINING_REQUESTED = "training.requested"
    TRAINING_JOB_STATUS_CHANGED = "training.job_status_changed"
    TRAINING_JOB_PROGRESS = "training.job_progress"
    ADAPTER_PUBLISHED = "adapter.published"
    ADAPTER_REJECTED = "adapter.rejected"
    ADAPTER_PROMOTED = "adapter.promoted"
