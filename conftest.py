"""Test configuration shared by every test in the repository."""

pytest_plugins = ["flywheel.core.testing.pytest_plugin"]
