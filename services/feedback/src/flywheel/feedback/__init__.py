"""Flywheel feedback service."""
