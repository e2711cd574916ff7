"""`python -m flywheel.inference`: run the inference service."""

from flywheel.core.runtime import run
from flywheel.inference.server import build

run(build)
