"""`python -m flywheel.critic`: run the critic service."""

from flywheel.core.runtime import run
from flywheel.critic.server import build

run(build)
