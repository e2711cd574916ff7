"""Shared library of every Flywheel service."""
