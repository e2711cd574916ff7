"""How a job's process is started: one process for one device, `accelerate launch` for more.

A job's `ResourceRequest` asks for GPUs, nodes and a strategy. One GPU (or the CPU) runs
``python -m flywheel.trainer.runner WORK_DIR`` directly. Several run the same module under
``accelerate launch`` with DDP, FSDP or DeepSpeed (its ZeRO config passed through as given,
written into the work folder), so TRL's trainers shard and synchronise as they do in any
accelerate setup. On Kubernetes the same command is a Job's container command (see
docs/scale-out.md); the service's own scheduler only places single-node jobs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from google.protobuf import json_format

from flywheel.contracts.trainer.v1 import resources_pb2 as tr

RUNNER = "flywheel.trainer.runner"
DEEPSPEED_CONFIG = "deepspeed.json"


def devices_needed(resources: tr.ResourceRequest) -> int:
    """GPUs a job holds on this node (0: it runs on the CPU)."""
    return int(resources.gpus)


def job_command(
    resources: tr.ResourceRequest, work_dir: Path, *, python: str = sys.executable
) -> list[str]:
    """The command line that runs the job in ``work_dir`` with ``resources``."""
    gpus = devices_needed(resources)
    if gpus <= 1 and resources.num_nodes <= 1:
        return [python, "-m", RUNNER, str(work_dir)]
    command = [python, "-m", "accelerate.commands.launch", "--num_processes", str(max(gpus, 1))]
    if resources.num_nodes > 1:
        # Rank and rendezvous come from the environment of each node's pod (MACHINE_RANK,
        # MAIN_PROCESS_IP, MAIN_PROCESS_PORT), as accelerate reads them.
        command += ["--num_machines", str(resources.num_nodes)]
    strategy = resources.strategy
    if strategy == tr.DISTRIBUTED_STRATEGY_FSDP:
        command += ["--use_fsdp"]
    elif strategy == tr.DISTRIBUTED_STRATEGY_DEEPSPEED:
        config = work_dir / DEEPSPEED_CONFIG
        config.write_text(
            json.dumps(json_format.MessageToDict(resources.deepspeed_config), indent=1)
        )
        command += ["--use_deepspeed", "--deepspeed_config_file", str(config)]
    else:  # DDP, the default for several devices
        command += ["--multi_gpu"]
    return [*command, "-m", RUNNER, str(work_dir)]
