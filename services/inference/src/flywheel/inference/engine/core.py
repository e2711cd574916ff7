"""The engine loop: continuous batching of concurrent requests over many LoRA adapters.

One thread owns the model. Each turn of its loop it runs the commands other threads
queued (adapter loads and unloads, between steps, so no forward pass sees a slot change),
admits waiting requests into the running batch (one batched prefill for all of them),
then decodes one token for every running sequence, whatever adapter each uses, and
delivers each sequence's new text to its request. Finished sequences leave the batch at
once and waiting ones take their place on the next turn: no request waits for the
slowest of a static batch.

Adapters live in CPU memory once loaded (any number of them); ``max_loras`` slots hold
those the running batch can use. A request whose adapter has no slot gets a free one or
the least recently used idle one, as vLLM does with ``--max-loras``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flywheel.inference.engine.kv_cache import BatchCache
from flywheel.inference.engine.lora import AdapterWeights, LoraSlots
from flywheel.inference.engine.sampling import RowSampler, SamplingParams, TextStream, choose_tokens
from flywheel.inference.engine.structured import (
    CompiledGrammar,
    GrammarCache,
    SequenceConstraint,
    apply_constraints,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownAdapterError(LookupError):
    """No adapter of that name is loaded."""


class AdapterExistsError(ValueError):
    """An adapter of that name is already loaded (names are immutable versions)."""


@dataclass(frozen=True)
class ChoiceEvent:
    """News of one choice of a request: new text, and at the end why it stopped."""

    index: int
    delta: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class EngineRequest:
    """A request as the engine sees it: token ids in, events out through ``sink``.

    ``sink`` is called from the engine thread with each ``ChoiceEvent``, or once with an
    exception if the request cannot be served; it must not block.
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[ChoiceEvent | BaseException], None]
    n: int = 1
    grammar: CompiledGrammar | None = None
    cancelled: bool = False


@dataclass
class _Sequence:
    request: EngineRequest
    index: int
    sampler: RowSampler
    stream: TextStream
    constraint: SequenceConstraint | None
    slot: int
    adapter: _Adapter | None
    last_token: int = 0
    finish_reason: str | None = None


@dataclass(eq=False)
class _Adapter:
    name: str
    path: str
    weights: AdapterWeights
    slot: int | None = None
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    removed: bool = False


class EngineCore:
    """Owns the model and the batch; every public method is safe from any thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_num_seqs: int,
    ) -> None:
        self.model = model.eval()  # type: ignore[no-untyped-call]
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        config = model.config
        self.max_model_len = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size = int(config.vocab_size)
        self.slots = LoraSlots(model, slots=max_loras, rank=max_lora_rank, max_rows=max_num_seqs)
        self.grammars = GrammarCache(tokenizer, self.vocab_size)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._num_layers = int(config.num_hidden_layers)
        self._batch = BatchCache(self._num_layers, max_num_seqs)
        self._running: list[_Sequence] = []
        self._waiting: deque[EngineRequest] = deque()
        self._adapters: dict[str, _Adapter] = {}
        # Copy-on-write view for readers on other threads (/v1/models).
        self.adapter_paths: dict[str, str] = {}
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ---- API for other threads -------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; running and waiting requests are aborted."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; its events arrive through ``request.sink``."""
        self.call_nowait(lambda: self._waiting.append(request))

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request (its client went away); its sequences leave the batch."""
        request.cancelled = True
        self.call_nowait(lambda: None)

    def add_adapter(self, name: str, path: str, weights: AdapterWeights) -> Future[None]:
        """Make ``name`` servable; the future fails with ``AdapterExistsError`` if taken."""
        return self.call(lambda: self._add_adapter(name, path, weights))

    def remove_adapter(self, name: str) -> Future[None]:
        """Stop serving ``name``; its running requests finish first."""
        return self.call(lambda: self._remove_adapter(name))

    def call(self, command: Callable[[], T]) -> Future[T]:
        """Run ``command`` on the engine thread between steps; its result as a future."""
        future: Future[T] = Future()
        self._commands.put((command, future))
        with self._wake:
            self._wake.notify()
        return future

    def call_nowait(self, command: Callable[[], Any]) -> None:
        """``call`` without waiting for the result."""
        self.call(command)

    # ---- engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and self._idle():
                    self._wake.wait()
                if self._stopping:
                    break
            self._run_commands()
            try:
                self._admit()
                if self._running:
                    self._decode()
            except Exception as error:  # a bug must not leave clients hanging
                log.exception("engine step failed")
                self._fail_all(error)
        self._run_commands()
        self._fail_all(RuntimeError("the engine is shutting down"))

    def _idle(self) -> bool:
        return self._commands.empty() and not self._running and not self._waiting

    def _run_commands(self) -> None:
        while True:
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(command())
            except BaseException as error:
                future.set_exception(error)

    def _add_adapter(self, name: str, path: str, weights: AdapterWeights) -> None:
        if name in self._adapters:
            raise AdapterExistsError(f"The lora adapter '{name}' has already been loaded.")
        adapter = _Adapter(name=name, path=path, weights=weights)
        self._adapters[name] = adapter
        free = self._free_slot()
        if free is not None:  # warm a slot now so the first request pays nothing
            self._assign(adapter, free)
        self.adapter_paths = {**self.adapter_paths, name: path}

    def _remove_adapter(self, name: str) -> None:
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise UnknownAdapterError(f"The lora adapter '{name}' cannot be found.")
        adapter.removed = True
        if adapter.users == 0 and adapter.slot is not None:
            self.slots.fill(adapter.slot, None)
            adapter.slot = None
        self.adapter_paths = {k: v for k, v in self.adapter_paths.items() if k != name}
        for request in [r for r in self._waiting if r.adapter == name]:
            self._waiting.remove(request)
            request.sink(UnknownAdapterError(f"The lora adapter '{name}' was unloaded."))

    def _free_slot(self) -> int | None:
        taken = {a.slot for a in self._adapters.values() if a.slot is not None}
        taken |= {s.slot for s in self._running}
        return next((s for s in range(1, self.slots.slots + 1) if s not in taken), None)

    def _assign(self, adapter: _Adapter, slot: int) -> None:
        for other in self._adapters.values():
            if other.slot == slot:
                other.slot = None
        self.slots.fill(slot, adapter.weights)
        adapter.slot = slot

    def _slot_for(self, name: str | None) -> int | None:
        """The slot a request for adapter ``name`` runs in; None if none is free now."""
        if name is None:
            return 0
        adapter = self._adapters[name]
        if adapter.slot is None:
            slot = self._free_slot()
            if slot is None:
                idle = [a for a in self._adapters.values() if a.slot is not None and a.users == 0]
                if not idle:
                    return None
                slot = min(idle, key=lambda a: a.last_used).slot
            assert slot is not None
            self._assign(adapter, slot)
        return adapter.slot

    def _admit(self) -> None:
        room = self.max_num_seqs - len(self._running)
        admitted: list[tuple[EngineRequest, int]] = []
        for request in list(self._waiting):
            if request.cancelled:
                self._waiting.remove(request)
                continue
            if request.adapter is not None and request.adapter not in self._adapters:
                self._waiting.remove(request)
                request.sink(UnknownAdapterError(f"The model '{request.adapter}' does not exist."))
                continue
            if request.n > room:
                break  # keep arrival order for big requests: no starvation of n > 1
            slot = self._slot_for(request.adapter)
            if slot is None:
                continue  # every slot busy with other adapters: wait for one to drain
            self._waiting.remove(request)
            if request.adapter is not None:
                adapter = self._adapters[request.adapter]
                adapter.users += request.n
                adapter.last_used = time.monotonic()
            admitted.append((request, slot))
            room -= request.n
        if admitted:
            self._prefill(admitted)

    @torch.inference_mode()
    def _prefill(self, admitted: list[tuple[EngineRequest, int]]) -> None:
        """One padded forward pass over the new prompts; their first tokens; join the batch."""
        prompts = [request.prompt_ids for request, _ in admitted]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        fresh = BatchCache(self._num_layers)
        self.slots.batch.set([slot for _, slot in admitted])
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=fresh.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        fresh.mask = mask
        fresh.positions = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        # n > 1: the choices of a request share its prompt's cache rows.
        rows = [row for row, (request, _) in enumerate(admitted) for _ in range(request.n)]
        fresh.replicate(rows)
        logits = output.logits[:, -1, :].float().index_select(0, torch.tensor(rows))
        sequences = [
            self._sequence(request, index, slot)
            for request, slot in admitted
            for index in range(request.n)
        ]
        self._batch.merge(fresh)
        self._running.extend(sequences)
        self._next_tokens(logits, sequences)
        self._retire()

    def _sequence(self, request: EngineRequest, index: int, slot: int) -> _Sequence:
        constraint = None if request.grammar is None else self.grammars.constraint(request.grammar)
        adapter = self._adapters.get(request.adapter) if request.adapter else None
        return _Sequence(
            request=request,
            index=index,
            sampler=RowSampler.create(request.params, request.prompt_ids, index),
            stream=TextStream(self.tokenizer, request.params.stop),
            constraint=constraint,
            slot=slot,
            adapter=adapter,
        )

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every running sequence."""
        batch = self._batch
        ids = torch.tensor([[s.last_token] for s in self._running], dtype=torch.long)
        mask = torch.cat([batch.mask, torch.ones((batch.rows, 1), dtype=torch.long)], dim=1)
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch.after_step()
        self._next_tokens(output.logits[:, -1, :].float(), self._running)
        self._retire()

    def _next_tokens(self, logits: torch.Tensor, sequences: list[_Sequence]) -> None:
        if any(s.constraint is not None for s in sequences):
            apply_constraints(logits, [s.constraint for s in sequences])
        tokens = choose_tokens(logits, [s.sampler for s in sequences])
        for sequence, token in zip(sequences, tokens, strict=True):
            self._advance(sequence, token)

    def _advance(self, sequence: _Sequence, token: int) -> None:
        sequence.last_token = token
        sequence.sampler.generated.append(token)
        if sequence.constraint is not None and token not in self.eos_ids:
            sequence.constraint.accept(token)
        params = sequence.request.params
        delta = sequence.stream.add(token, special=token in self.special_ids)
        generated = len(sequence.sampler.generated)
        ends = token in self.eos_ids and not params.ignore_eos
        if ends or sequence.stream.stopped:
            sequence.finish_reason = "stop"
        elif (
            generated >= params.max_tokens
            or len(sequence.request.prompt_ids) + generated >= self.max_model_len
        ):
            sequence.finish_reason = "length"
        if sequence.finish_reason is not None:
            delta += sequence.stream.finish()
        if delta or sequence.finish_reason is not None:
            sequence.request.sink(
                ChoiceEvent(sequence.index, delta, sequence.finish_reason, generated)
            )

    def _retire(self) -> None:
        """Drop finished and cancelled sequences from the batch; set the new row slots."""
        done = [
            row
            for row, s in enumerate(self._running)
            if s.finish_reason is not None or s.request.cancelled
        ]
        if done:
            for row in done:
                self._release(self._running[row])
            self._batch.remove(done)
            # The same swap-remove as the cache: each hole takes the current last row.
            for row in sorted(done, reverse=True):
                last = self._running.pop()
                if row < len(self._running):
                    self._running[row] = last
        self.slots.batch.set([s.slot for s in self._running])

    def _release(self, sequence: _Sequence) -> None:
        adapter = sequence.adapter
        if adapter is None:
            return
        adapter.users -= 1
        adapter.last_used = time.monotonic()
        if adapter.removed and adapter.users == 0 and adapter.slot is not None:
            self.slots.fill(adapter.slot, None)
            adapter.slot = None

    def _fail_all(self, error: BaseException) -> None:
        failed = {id(s.request): s.request for s in self._running}
        failed.update({id(r): r for r in self._waiting})
        for sequence in self._running:
            self._release(sequence)
        self._running, self._waiting = [], deque()
        self._batch = BatchCache(self._num_layers, self.max_num_seqs)
        self.slots.batch.set([])
        for request in failed.values():
            request.sink(error)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a sequence: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return ids
