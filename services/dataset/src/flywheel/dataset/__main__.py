"""`python -m flywheel.dataset`: run the dataset service."""

from flywheel.core.runtime import run
from flywheel.dataset.server import build

run(build)
