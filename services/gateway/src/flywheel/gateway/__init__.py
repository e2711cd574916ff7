"""Flywheel gateway service."""
