"""Flywheel dataset service."""
