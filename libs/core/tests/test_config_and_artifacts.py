"""Settings defaults and safety; the artifact store's atomic, checksummed writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from flywheel.core.artifacts import ArtifactError, LocalArtifactStore
from flywheel.core.config import ServiceSettings


class _WithSecret(ServiceSettings):
    api_key_pepper: SecretStr = SecretStr("change-me")


def test_embedded_defaults_need_no_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    settings = ServiceSettings(service_name="feedback")
    assert settings.resolved_database_url == (
        f"sqlite+aiosqlite:///{(tmp_path / 'feedback.sqlite3').resolve()}"
    )
    assert settings.resolved_schema is None
    assert settings.event_bus == "embedded"
    assert settings.resolved_artifacts_dir == tmp_path / "artifacts"


def test_postgres_gets_a_schema_per_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql+asyncpg://u:p@db/flywheel")
    assert ServiceSettings(service_name="dataset").resolved_schema == "dataset"


def test_production_refuses_placeholder_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="api_key_pepper"):
        _WithSecret()
    monkeypatch.setenv("FLYWHEEL_API_KEY_PEPPER", "a-real-secret")
    assert _WithSecret().api_key_pepper.get_secret_value() == "a-real-secret"


def test_bad_settings_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_EVENT_BUS", "carrier-pigeon")
    with pytest.raises(ValidationError, match="event_bus"):
        ServiceSettings()


def test_artifacts_round_trip_with_sha256(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    data = b"adapter weights" * 1000
    info = store.put_bytes("adapters/acme/v1/adapter.safetensors", data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size == len(data)
    with store.open("adapters/acme/v1/adapter.safetensors") as f:
        assert f.read() == data
    source = tmp_path / "snapshot.jsonl"
    source.write_text('{"prompt": "p"}\n')
    store.put_file("datasets/s1.jsonl", source)
    assert [a.key for a in store.list()] == [
        "adapters/acme/v1/adapter.safetensors",
        "datasets/s1.jsonl",
    ]
    assert [a.key for a in store.list("datasets/")] == ["datasets/s1.jsonl"]
    assert (
        store.verify("datasets/s1.jsonl").sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    )
    # No temporary files are left behind.
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    store.put_bytes("a/b.bin", b"original")
    (tmp_path / "a" / "b.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="corrupt"):
        store.verify("a/b.bin")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../escape", "a/../../b", "x.sha256"])
def test_keys_cannot_escape_the_store(tmp_path: Path, key: str) -> None:
    with pytest.raises(ArtifactError):
        LocalArtifactStore(tmp_path).put_bytes(key, b"x")


def test_missing_artifacts_raise(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    assert not store.exists("nope")
    with pytest.raises(ArtifactError, match="no artifact"):
        store.open("nope")
    store.put_bytes("gone", b"x")
    store.delete("gone")
    assert not store.exists("gone")
