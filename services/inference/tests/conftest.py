"""Fixtures of the inference service's tests: a tiny base model of our own and real PEFT
LoRA adapters for it, published the trainer's way (safetensors + manifest.json)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.trainer import manifest
from flywheel.trainer.bootstrap import bootstrap_model
from flywheel.trainer.runner import RecordedOutcome
from flywheel.trainer.spec import TrainSpec
from flywheel.trainer.testing import TINY


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few-step pretrained two-layer Llama (hidden 32, MLP 64) with its own tokenizer."""
    return bootstrap_model(tmp_path_factory.mktemp("models"), TINY, progress=False)


@pytest.fixture(scope="session")
def make_adapter(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_adapter(r=4, alpha=8.0, targets=("q_proj", "v_proj"), *, use_rslora=False,
    use_dora=False, seed=0, dtype=None)``: a published-like adapter folder (PEFT files and
    the trainer's manifest.json) with seeded random A and B. Folders are shared between
    tests: copy one before changing it."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple[object, ...], Path] = {}

    def make(
        r: int = 4,
        alpha: float = 8.0,
        targets: tuple[str, ...] = ("q_proj", "v_proj"),
        *,
        use_rslora: bool = False,
        use_dora: bool = False,
        seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> Path:
        key = (r, alpha, targets, use_rslora, use_dora, seed, dtype)
        if key in made:
            return made[key]
        torch.manual_seed(seed)  # PEFT's kaiming init of A
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT takes any number
            target_modules=list(targets),
            use_rslora=use_rslora,
            use_dora=use_dora,
            lora_dropout=0.0,
        )
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # PEFT starts B at zero: the adapter would change nothing
            for name, param in sorted(peft_model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        folder = root / f"adapter-{len(made)}"
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        if dtype is not None:
            weights = folder / "adapter_model.safetensors"
            tensors = {k: v.to(dtype) for k, v in load_file(weights).items()}
            save_file(tensors, weights, metadata={"format": "pt"})
        lora = {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": sorted(targets)}
        outcome = RecordedOutcome(
            adapter_dir=folder,
            metrics={"eval_loss": 1.0},
            hyperparameters={},
            lora={**lora, "use_rslora": use_rslora},
            steps=1,
            resumed_from_step=None,
        )
        spec = TrainSpec(method="sft", base_model=str(base_model), train_file=Path("train.jsonl"))
        ref = AdapterRef(name=f"adapter-{len(made)}", version="v1")
        built = manifest.build_manifest(spec, outcome, tenant_id="acme", adapter=ref)
        manifest.write_folder(built, folder, folder)
        made[key] = folder
        return folder

    return make
