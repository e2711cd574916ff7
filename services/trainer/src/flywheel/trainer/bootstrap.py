"""`flywheel bootstrap-model`: a small base model of our own, with no model hub.

Trains a byte-level BPE tokenizer and pretrains a few-million-parameter Llama on the
retail-media plug-in's synthetic corpus (prompts with good, mediocre and bad answers, in a
chat layout), on the CPU in minutes. The result is a normal Hugging Face model folder
(safetensors weights, ``tokenizer.json`` with a chat template, ``manifest.json``) that
transformers, PEFT and vLLM load like any other, and whose outputs vary in quality, so the
loop has something to improve.

Models are cached by their configuration: asking again for the same one returns the
folder at once. A folder appears only when complete (built beside it, then renamed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flywheel.core.artifacts import sha256_tree
from flywheel.domains.retail_media import corpus

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# The layout every prompt and answer is pretrained in; SFT and serving use the same.
CHAT_TEMPLATE = (
    # Newlines as expressions: transformers renders templates with trim_blocks, which
    # would drop a newline written right after a block tag.
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BootstrapConfig:
    """What the model is: every field goes into the cache key."""

    examples: int = 20_000
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 688
    layers: int = 4
    heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0

    def key(self) -> str:
        """Short hash of the configuration: the cache folder's name."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chat(prompt: str, answer: str) -> str:
    return f"{BOS}<|user|>\n{prompt}\n<|assistant|>\n{answer}{EOS}\n"


def documents(config: BootstrapConfig) -> list[str]:
    """The pretraining corpus: seeded retail-media examples in the chat layout."""
    return [_chat(e.prompt, e.answer) for e in corpus(config.examples, config.seed)]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _blocks(ids: list[int], seq_len: int) -> torch.Tensor:
    """The token stream cut into full ``seq_len`` blocks (packing: no padding at all)."""
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)


def _batches(blocks: torch.Tensor, config: BootstrapConfig) -> Iterator[torch.Tensor]:
    """Seeded shuffled batches of blocks, epoch after epoch."""
    if len(blocks) == 0:
        raise ValueError(f"the corpus is shorter than one block of {config.seq_len} tokens")
    size = min(config.batch_size, len(blocks))
    generator = torch.Generator().manual_seed(config.seed)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - size + 1, size):
            yield blocks[order[start : start + size]]


def _learning_rate(step: int, config: BootstrapConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    config: BootstrapConfig, tokenizer: PreTrainedTokenizerFast, texts: list[str], progress: bool
) -> tuple[LlamaForCausalLM, list[float]]:
    """Pretrain a fresh Llama on ``texts``; the model and its loss per step."""
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            max_position_embeddings=max(512, config.seq_len),
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    blocks = _blocks(stream, config.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.1)
    losses: list[float] = []
    model.train()
    batches = _batches(blocks, config)
    bar = tqdm(range(config.steps), desc="pretraining", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()  # type: ignore[no-untyped-call]
    return model, losses


def bootstrap_model(
    root: Path, config: BootstrapConfig | None = None, *, progress: bool = True, force: bool = False
) -> Path:
    """The folder of the model ``config`` describes under ``root``, built if not cached."""
    config = config or BootstrapConfig()
    target = root / f"bootstrap-{config.key()}"
    if (target / MANIFEST).is_file() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    texts = documents(config)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    torch.set_num_threads(os.cpu_count() or 1)
    model, losses = pretrain(config, tokenizer, texts, progress)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        model.save_pretrained(building, safe_serialization=True)
        tokenizer.save_pretrained(building)
        files = sha256_tree(building)
        manifest: dict[str, Any] = {
            "kind": "flywheel-bootstrap-model",
            "config": dataclasses.asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "seconds": round(time.monotonic() - started, 1),
            "files": files,
        }
        (building / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if force and target.exists():
            shutil.rmtree(target)
        building.rename(target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def sample(path: Path, *, seed: int = 0, max_new_tokens: int = 60) -> tuple[str, str]:
    """A budgeting prompt the corpus never had, and the model's sampled answer to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.domains.retail_media import budgeting_prompt

    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    prompt = budgeting_prompt(random.Random(10_000 + seed)).text
    text = str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    )
    ids: torch.Tensor = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95
        )
    answer = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return prompt, answer.strip()
