"""A tenant's users and task types."""
