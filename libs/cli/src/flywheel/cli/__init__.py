"""The `flywheel` command."""
