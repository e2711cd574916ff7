"""Flywheel critic service."""
