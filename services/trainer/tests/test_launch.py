"""Jobs asking for several GPUs are launched with accelerate; one device runs the module."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.struct_pb2 import Struct

from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.trainer.launch import job_command


def test_one_device_runs_the_runner_module(tmp_path: Path) -> None:
    assert job_command(tr.ResourceRequest(gpus=1), tmp_path, python="py") == [
        "py", "-m", "flywheel.trainer.runner", str(tmp_path),
    ]  # fmt: skip


def test_several_gpus_use_accelerate_with_the_strategy(tmp_path: Path) -> None:
    ddp = job_command(tr.ResourceRequest(gpus=4), tmp_path, python="py")
    assert ddp[:5] == ["py", "-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert "--multi_gpu" in ddp
    assert ddp[-3:] == ["-m", "flywheel.trainer.runner", str(tmp_path)]
    fsdp = job_command(
        tr.ResourceRequest(gpus=8, num_nodes=2, strategy=tr.DISTRIBUTED_STRATEGY_FSDP), tmp_path
    )
    assert "--use_fsdp" in fsdp
    assert fsdp[fsdp.index("--num_machines") + 1] == "2"
    zero = Struct()
    zero.update({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    resources = tr.ResourceRequest(
        gpus=2, strategy=tr.DISTRIBUTED_STRATEGY_DEEPSPEED, deepspeed_config=zero
    )
    deepspeed = job_command(resources, tmp_path)
    config = Path(deepspeed[deepspeed.index("--deepspeed_config_file") + 1])
    assert json.loads(config.read_text())["zero_optimization"] == {"stage": 3.0}
