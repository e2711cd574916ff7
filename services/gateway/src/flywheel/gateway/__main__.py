"""`python -m flywheel.gateway`: run the gateway service."""

from flywheel.core.runtime import run
from flywheel.gateway.server import build

run(build)
