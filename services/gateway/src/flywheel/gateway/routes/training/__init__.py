"""Training jobs and the adapters they publish, through the trainer service."""
