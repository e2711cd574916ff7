"""Settings of the gateway (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from pydantic import Field

from flywheel.core.config import ServiceSettings

DEFAULT_UPSTREAMS = {
    "feedback": "127.0.0.1:50052",
    "dataset": "127.0.0.1:50053",
    "trainer": "127.0.0.1:50054",
    "inference": "127.0.0.1:50055",
    "critic": "127.0.0.1:50056",
}


class GatewaySettings(ServiceSettings):
    """The gateway's settings: its REST port, the services behind it and its REST limits."""

    service_name: str = "gateway"
    grpc_port: int = 50051
    metrics_port: int = 9101
    http_port: int = 8080
    upstreams: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_UPSTREAMS),
        description='gRPC host:port per service, as JSON: {"feedback": "host:port", ...}.',
    )
    inference_url: str = Field(
        "http://127.0.0.1:8105",
        pattern=r"^https?://[^/\s]+",
        description="Base URL of the inference service's OpenAI-compatible HTTP API (without "
        "`/v1`), which `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` "
        "proxy under the caller's tenant; `flywheel up` sets it.",
    )
    inference_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait for the inference service's next bytes: its whole answer to "
        "a non-streamed completion, or the next chunk of a streamed one. Past it the caller "
        "gets 504 (or, once a stream started, an error event ending it).",
    )
    upstream_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of each unary gRPC call to a service behind the gateway."
    )
    dataset_build_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Deadline of dataset calls that curate the tenant's feedback (build, "
        "preview, diff, training requests), which take longer than a lookup on big tenants.",
    )
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Largest request body accepted; larger ones get 413, counted while the "
        "body streams in (Content-Length is not trusted alone).",
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=list,
        description='Origins allowed to call the API from a browser, as JSON: ["https://x"]. '
        "Empty: no CORS headers at all.",
    )
    rate_limit_per_s: float = Field(
        50.0, ge=0, description="Sustained requests per second per API key; 0 turns limits off."
    )
    rate_limit_burst: int = Field(
        100, ge=1, description="Requests an API key may make at once before the rate applies."
    )
    auth_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        description="How long a verified API key is trusted without asking the feedback "
        "service again; a revoked key keeps working on this gateway for up to this long.",
    )
    auth_cache_size: int = Field(10_000, ge=1, description="Verified keys kept in memory (LRU).")
    idempotency_ttl_s: float = Field(
        24 * 3600.0, gt=0, description="How long an Idempotency-Key and its response are kept."
    )
    idempotency_lock_timeout_s: float = Field(
        180.0,
        gt=0,
        description="An Idempotency-Key still in flight after this long is taken to belong to "
        "a crashed request, and a retry may run again. Keep it above upstream_timeout_s "
        "and dataset_build_timeout_s.",
    )
    feedback_batch_max_items: int = Field(
        128,
        ge=1,
        description="Most feedback POSTs sent to the feedback service as one "
        "BatchRecordFeedback call (one transaction); 1 sends each on its own.",
    )
    feedback_batch_concurrency: int = Field(
        4,
        ge=1,
        description="Feedback batches in flight at once; further POSTs wait and leave "
        "together in the next batch.",
    )
