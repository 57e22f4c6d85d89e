"""Continuous batching across Ray Data batches: one thread steps the engine, several batches
feed it at once.

Ray Data calls an engine stage once per batch. `LLM.generate` per call runs the batch to its
last sequence before the next batch starts, so the engine's sequence slots empty out at the end
of every batch. Here a call submits its batch's requests and waits for just those, and the
thread that steps the engine (the only one that touches it: it is not thread-safe) adds them
between steps, so the next batch's requests take the slots the last one frees.

The thread builds the engine too. Each thread that runs torch ops on CPU gets its own OpenMP
team; with a second (idle) team in the process, libgomp counts more threads than cores and its
workers sleep after a few spins instead of waiting for the next op: an engine on two cores kept
1.5 of them busy."""

import asyncio
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from pipeline.engine.steps import StepClock

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest


class Engine(Protocol):
    """What the loop uses of vLLM's `LLMEngine` (`LLM.llm_engine`)."""

    def add_request(
        self, request_id: str, prompt: Any, params: "SamplingParams", lora_request: "LoRARequest | None" = None
    ) -> Any: ...

    def step(self) -> list["RequestOutput"]: ...

    def abort_request(self, request_ids: list[str]) -> None: ...


class EngineFailed(RuntimeError):
    """The engine raised while stepping: the batches waiting on it and all later ones fail."""


@dataclass(frozen=True)
class RequestRefused:
    """In place of a request's output: why the engine would not take it."""

    reason: str


@dataclass(eq=False)
class _Batch:
    prompts: list[Any]
    params: list["SamplingParams"]
    loras: list["LoRARequest | None"]
    done: Future = field(default_factory=Future)  # the outputs, in the order of the prompts
    ids: list[str] = field(default_factory=list)
    outputs: dict[str, "RequestOutput | RequestRefused"] = field(default_factory=dict)

    def finish_if_done(self) -> None:
        if len(self.outputs) == len(self.ids):
            self.done.set_result([self.outputs[i] for i in self.ids])


@dataclass(eq=False)
class _Abort:
    batch: _Batch
    done: Future = field(default_factory=Future)


class EngineLoop:
    """Builds an engine (`build`) and steps it in a thread of its own while any request is
    unfinished. Batches submit from the asyncio loop that runs the stage's calls; an error that
    stops the engine fails every batch waiting on it, and every later one, rather than leaving
    them waiting. Each step's duration goes to `clock`."""

    def __init__(self, build: Callable[[], Engine], clock: StepClock | None = None):
        self._clock = clock or StepClock()
        self._inbox: queue.SimpleQueue[_Batch | _Abort] = queue.SimpleQueue()
        self._waiting: dict[str, _Batch] = {}  # request id -> its batch, until the request finishes
        self._ids = itertools.count()
        # Orders submissions against the loop's failure, so none lands in an inbox nobody reads.
        self._lock = threading.Lock()
        self._failure: EngineFailed | None = None
        built: Future = Future()
        threading.Thread(target=self._run, args=(build, built), name="engine-loop", daemon=True).start()
        built.result()  # raises what building raised

    async def generate(
        self, prompts: list[Any], params: list["SamplingParams"], loras: list["LoRARequest | None"] | None = None
    ) -> list["RequestOutput | RequestRefused"]:
        """Adds the requests (prompts as `LLMEngine.add_request` takes them, each under its LoRA
        adapter in `loras`, if any) before the next step and waits until all of them finish;
        their outputs, in the order of the prompts, a request the engine refused as
        `RequestRefused`."""
        batch = _Batch(prompts, params, loras or [None] * len(prompts))
        self._put(batch)
        try:
            return await asyncio.shield(asyncio.wrap_future(batch.done))
        except asyncio.CancelledError:
            # The caller may release what the requests use (a decode stage's offered KV) once
            # this returns: take them out of the engine first.
            abort = _Abort(batch)
            self._put(abort)
            await asyncio.shield(asyncio.wrap_future(abort.done))
            raise

    def _put(self, item: "_Batch | _Abort") -> None:
        with self._lock:
            if self._failure is None:
                self._inbox.put(item)
            elif isinstance(item, _Abort):
                item.done.set_result(None)
            else:
                item.done.set_exception(self._failure)

    def _run(self, build: Callable[[], Engine], built: Future) -> None:
        # OpenMP's thread count is per thread, and a new thread starts from OMP_NUM_THREADS;
        # this sets this one's to what the process gave torch (bind_threads) before the
        # engine's kernels read it.
        torch.get_num_threads()
        try:
            self._engine = build()
            built.set_result(None)
        except BaseException as error:
            built.set_exception(error)
            return
        try:
            while True:
                if not self._waiting:
                    self._take(self._inbox.get())  # idle until a batch comes
                while not self._inbox.empty():
                    self._take(self._inbox.get_nowait())
                if self._waiting:
                    self._step()
        except BaseException as error:  # whatever stops the loop fails every batch
            self._fail(error)

    def _take(self, item: "_Batch | _Abort") -> None:
        if isinstance(item, _Batch):
            self._add(item)
            return
        # Its batch came in first (one queue), so its requests are in the engine or done.
        unfinished = [i for i in item.batch.ids if self._waiting.pop(i, None) is not None]
        if unfinished:
            self._engine.abort_request(unfinished)
        item.done.set_result(None)

    def _add(self, batch: _Batch) -> None:
        for prompt, params, lora in zip(batch.prompts, batch.params, batch.loras):
            request_id = str(next(self._ids))
            batch.ids.append(request_id)
            try:
                self._engine.add_request(request_id, prompt, params, lora_request=lora)
            except Exception as error:  # a request the engine refuses is that request's error alone
                batch.outputs[request_id] = RequestRefused(str(error))
                continue
            self._waiting[request_id] = batch
        batch.finish_if_done()

    def _step(self) -> None:
        started = time.perf_counter()
        outputs = self._engine.step()
        self._clock.step(time.perf_counter() - started)
        for output in outputs:
            batch = self._waiting.pop(output.request_id, None) if output.finished else None
            if batch is None:  # not finished, or its batch was aborted
                continue
            batch.outputs[output.request_id] = output
            batch.finish_if_done()

    def _fail(self, error: BaseException) -> None:
        failure = EngineFailed(f"the engine failed: {error!r}")
        failure.__cause__ = error
        with self._lock:
            self._failure = failure
            pending = list(self._waiting.values())
            while not self._inbox.empty():
                pending.append(self._inbox.get())
        for item in pending:
            if item.done.done():  # a batch waiting on several requests is listed once for each
                continue
            if isinstance(item, _Abort):
                item.done.set_result(None)
            else:
                item.done.set_exception(failure)
