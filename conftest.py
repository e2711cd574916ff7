"""Test configuration shared by every test in the repository."""

import os

pytest_plugins = ["flywheel.core.testing.pytest_plugin"]

# No test may need the network: a Hugging Face id (a tokenizer spec, say) fails at once
# instead of waiting on a download, here and in every service the tests start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
