"""`python -m flywheel.feedback`: run the feedback service."""

from flywheel.core.runtime import run
from flywheel.feedback.server import build

run(build)
