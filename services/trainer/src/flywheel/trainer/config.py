"""Settings of the trainer service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flywheel.core.config import ServiceSettings


class TrainerSettings(ServiceSettings):
    """The trainer service's settings; defaults give it its own ports on one machine."""

    service_name: str = "trainer"
    grpc_port: int = 50054
    metrics_port: int = 9104

    trainer_devices: list[str] = Field(
        ["cpu"],
        description='Devices jobs run on, one job each at a time: ["cpu"] or ["cuda:0", "cuda:1"].',
    )
    trainer_default_base_model: str = Field(
        "", description="Base model of requests that name none (Hugging Face id or folder)."
    )
    trainer_checkpoint_every_steps: int = Field(
        50, ge=0, description="Checkpoint interval of jobs whose spec sets none (0: never)."
    )
    trainer_work_dir: Path | None = Field(
        None, description="Job folders (checkpoints, logs); defaults to data_dir/trainer/jobs."
    )
    trainer_poll_s: float = Field(1.0, gt=0, description="How often running jobs are looked at.")
    trainer_progress_event_interval_s: float = Field(
        5.0, ge=0, description="Least time between two training.job_progress events of a job."
    )

    def resolved_work_dir(self) -> Path:
        return self.trainer_work_dir or self.data_dir / "trainer" / "jobs"
