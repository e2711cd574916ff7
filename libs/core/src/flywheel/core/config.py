"""Settings shared by every service.

Each service declares one settings class that inherits :class:`ServiceSettings`; values come
from ``FLYWHEEL_*`` environment variables (or a ``.env`` file). The embedded default needs no
configuration at all: SQLite files and the embedded event log under ``data_dir``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets left at this value are fine on a laptop and refused in production.
PLACEHOLDER_SECRET = "change-me"


class Environment(StrEnum):
    """Where a service runs; production refuses placeholder secrets."""

    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ServiceSettings(BaseSettings):
    """Settings every service has: storage, event bus, ports, logging."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", env_file=".env", extra="ignore", validate_default=True
    )

    service_name: str = Field("flywheel", description="Name used in logs, metrics and events.")
    environment: Environment = Environment.DEVELOPMENT
    data_dir: Path = Field(
        Path(".flywheel/data"),
        description="Where the embedded default keeps SQLite files, the event log and artifacts.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL. Unset: a SQLite file per service in data_dir. "
        "PostgreSQL: postgresql+asyncpg://user:pass@host/db (one schema per service).",
    )
    database_schema: str | None = Field(
        None, description="PostgreSQL schema of this service; defaults to the service name."
    )
    event_bus: Literal["embedded", "kafka"] = "embedded"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    event_log_url: str | None = Field(
        None,
        description="Database URL of the embedded event log; defaults to data_dir/events.sqlite3.",
    )
    artifacts_dir: Path | None = Field(None, description="Defaults to data_dir/artifacts.")
    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    http_port: int = Field(8080, ge=0, le=65535)
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics; 0 = off.")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    outbox_batch_size: int = Field(500, ge=1)
    outbox_retention_s: float = Field(
        24 * 3600.0, ge=0, description="How long published outbox rows are kept."
    )

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Self:
        if self.environment is Environment.PRODUCTION:
            bad = [
                name
                for name, value in self.__dict__.items()
                if isinstance(value, SecretStr)
                and value.get_secret_value() in ("", PLACEHOLDER_SECRET)
            ]
            if bad:
                raise ValueError(f"placeholder secret(s) in production: {', '.join(sorted(bad))}")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The service database URL, defaulting to a SQLite file of its own."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{self.service_name}.sqlite3').resolve()}"

    @property
    def resolved_schema(self) -> str | None:
        """PostgreSQL schema of this service (None on SQLite, which has none)."""
        if not self.resolved_database_url.startswith("postgresql"):
            return None
        return self.database_schema or self.service_name

    @property
    def resolved_event_log_url(self) -> str:
        """Database URL of the embedded event log shared by the services on one machine."""
        if self.event_log_url:
            return self.event_log_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'events.sqlite3').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        """Root folder of the local artifact store."""
        return self.artifacts_dir or self.data_dir / "artifacts"
