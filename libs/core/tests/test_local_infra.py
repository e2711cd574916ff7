"""The local infrastructure really runs: PostgreSQL via asyncpg, Kafka via kafka-python."""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from flywheel.core.testing.local_infra import LocalKafka, LocalPostgres, free_port

pytestmark = pytest.mark.integration


async def _scalar(url: str, sql: str) -> object:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar_one()
    finally:
        await engine.dispose()


async def test_postgres_select_one(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+asyncpg://")
    assert await _scalar(pg_url, "SELECT 1") == 1
    assert await _scalar(pg_url, "SHOW fsync") == "on"


async def test_create_database_gives_isolated_databases(postgres: LocalPostgres) -> None:
    suffix = uuid.uuid4().hex[:8]
    url_a = postgres.create_database(f"iso_a_{suffix}")
    url_b = postgres.create_database(f"iso_b_{suffix}")
    try:
        assert url_a.endswith(f"/iso_a_{suffix}")
        engine = create_async_engine(url_a)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE only_in_a (x int)"))
                await conn.execute(text("INSERT INTO only_in_a VALUES (42)"))
        finally:
            await engine.dispose()
        assert await _scalar(url_a, "SELECT x FROM only_in_a") == 42
        assert await _scalar(url_a, "SELECT current_database()") == f"iso_a_{suffix}"
        assert await _scalar(url_b, "SELECT to_regclass('only_in_a') IS NULL") is True
    finally:
        postgres.drop_database(f"iso_a_{suffix}")
        postgres.drop_database(f"iso_b_{suffix}")


async def test_postgres_restart_keeps_data() -> None:
    port = free_port()
    # Outside pytest's basetemp, which other sessions re-chmod (see pytest_plugin).
    with (
        tempfile.TemporaryDirectory(prefix="flywheel-pg-") as data_dir,
        LocalPostgres(data_dir=Path(data_dir) / "pg", port=port) as pg,
    ):
        assert pg.port == port
        url = pg.create_database("durable")
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (v text)"))
                await conn.execute(text("INSERT INTO t VALUES ('kept')"))
        finally:
            await engine.dispose()
        pg.stop()
        assert not pg.is_running()
        assert pg.start() == pg.url
        assert pg.is_running()
        assert await _scalar(url, "SELECT v FROM t") == "kept"
    assert not pg.is_running()


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    try:
        producer.send(topic, value=value, key=b"k").get(timeout=60)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def _consume_one(consumer: KafkaConsumer, timeout_s: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                value: bytes = record.value
                return value
    raise AssertionError(f"no record within {timeout_s}s")


def test_kafka_produce_consume(kafka: LocalKafka) -> None:
    topic = f"infra-{uuid.uuid4().hex[:8]}"
    _produce(kafka.bootstrap, topic, b"hello")
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id=f"g-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        assert _consume_one(consumer) == b"hello"
    finally:
        consumer.close()


def test_kafka_restart_keeps_committed_data_and_offsets(kafka_broker: LocalKafka) -> None:
    bootstrap = kafka_broker.bootstrap
    topic, group = "durable", "durable-group"
    _produce(bootstrap, topic, b"survives")
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        assert _consume_one(consumer) == b"survives"
        consumer.commit()
    finally:
        consumer.close(autocommit=False)

    assert kafka_broker.restart() == bootstrap
    assert kafka_broker.is_running()

    # The record is still there ...
    reader = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = reader.partitions_for_topic(topic)
        assert partitions is not None
        assert len(partitions) == 3
        reader.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        reader.seek_to_beginning()
        assert _consume_one(reader) == b"survives"
    finally:
        reader.close(autocommit=False)

    # ... and so is the group's committed offset: nothing left to read.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        committed = {
            p: consumer.committed(TopicPartition(topic, p))
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        }
        assert sum(offset or 0 for offset in committed.values()) == 1, committed
    finally:
        consumer.close(autocommit=False)
