"""Dataset snapshots, training requests and trigger policies (the dataset service)."""
