"""Flywheel trainer service."""
