"""Flywheel inference service."""
