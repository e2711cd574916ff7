"""Test helpers: a real PostgreSQL and Kafka on loopback (local_infra) and pytest fixtures."""
