"""`python -m flywheel.trainer`: run the trainer service."""

from flywheel.core.runtime import run
from flywheel.trainer.server import build

run(build)
