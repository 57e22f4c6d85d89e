"""The engine loop's own logic, against a stand-in for vLLM's LLMEngine: batches feed one engine
at once, each gets its own outputs, and nothing is left waiting when the engine fails."""

import asyncio
import threading
import time
from collections import deque
from types import SimpleNamespace

import pytest

from pipeline.engine.loop import EngineFailed, EngineLoop, RequestRefused
from pipeline.engine.steps import StepClock

TIMEOUT = 10.0


class FakeEngine:
    """Stands in for LLMEngine: a request's prompt is the number of steps it runs, at most
    `max_seqs` run at once, first come first served, and a negative one is refused. The first
    step waits for `gate`, so a test can queue several batches first; a step takes `seconds`;
    `fail_at` makes step number `fail_at` raise."""

    def __init__(self, max_seqs: int = 4, fail_at: int | None = None, seconds: float = 0.0):
        self.max_seqs, self.fail_at, self.seconds = max_seqs, fail_at, seconds
        self.gate = threading.Event()
        self.waiting: deque[list] = deque()
        self.running: dict[str, list] = {}
        self.per_step: list[list[str]] = []  # the requests that ran in each step
        self.aborted: list[str] = []

    def add_request(self, request_id: str, prompt: int, params, lora_request=None) -> str:
        if prompt < 0:
            raise ValueError(f"request {request_id} refused")
        self.waiting.append([request_id, prompt])
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        self.waiting = deque(r for r in self.waiting if r[0] not in request_ids)
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def step(self) -> list[SimpleNamespace]:
        assert self.gate.wait(TIMEOUT)
        time.sleep(self.seconds)
        if len(self.per_step) + 1 == self.fail_at:
            raise RuntimeError("engine broke")
        while self.waiting and len(self.running) < self.max_seqs:
            request_id, steps = self.waiting.popleft()
            self.running[request_id] = [steps, steps]
        self.per_step.append(list(self.running))
        outputs = []
        for request_id, state in list(self.running.items()):
            state[1] -= 1
            if state[1] == 0:
                del self.running[request_id]
                outputs.append(SimpleNamespace(request_id=request_id, finished=True, prompt=state[0]))
        return outputs


def run(*coroutines):
    """Runs the coroutines as concurrent tasks on one event loop (as Ray Data runs a stage's
    calls), the engine's first step held until all of them have submitted."""

    async def main(engine: FakeEngine):
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        await asyncio.sleep(0)  # each task runs up to its first wait: its batch is submitted
        engine.gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT)

    return main


def test_each_batch_gets_its_outputs_in_its_order():
    engine = FakeEngine()
    loop = EngineLoop(lambda: engine)
    a, b = asyncio.run(run(loop.generate([3, 1, 2], [None] * 3), loop.generate([2, 1], [None] * 2))(engine))
    assert [o.prompt for o in a] == [3, 1, 2] and [o.prompt for o in b] == [2, 1]
    assert asyncio.run(loop.generate([], [])) == []


def test_next_batch_takes_the_slots_the_last_one_frees():
    """Batch a has three 1-step requests and an 8-step one: run batch by batch, b would wait 8
    steps with 3 of 4 slots empty; fed together, b's requests run beside a's long one."""
    engine = FakeEngine(max_seqs=4)
    loop = EngineLoop(lambda: engine)
    asyncio.run(run(loop.generate([1, 1, 1, 8], [None] * 4), loop.generate([1, 1, 1, 1], [None] * 4))(engine))
    assert [len(ran) for ran in engine.per_step] == [4, 4, 2, 1, 1, 1, 1, 1]  # 8 steps, not 9
    assert engine.per_step[1] == ["3", "4", "5", "6"]


def test_an_engine_error_fails_every_waiting_batch_and_every_later_one():
    engine = FakeEngine(fail_at=2)
    loop = EngineLoop(lambda: engine)
    a, b = asyncio.run(run(loop.generate([3], [None]), loop.generate([2, 2], [None] * 2))(engine))
    assert isinstance(a, EngineFailed) and isinstance(b, EngineFailed)
    assert "engine broke" in str(a) and isinstance(a.__cause__, RuntimeError)
    with pytest.raises(EngineFailed):
        asyncio.run(asyncio.wait_for(loop.generate([1], [None]), TIMEOUT))


def test_a_refused_request_is_its_own_error_and_the_rest_complete():
    engine = FakeEngine()
    loop = EngineLoop(lambda: engine)
    mixed, fine = asyncio.run(run(loop.generate([2, -1, 1], [None] * 3), loop.generate([-5], [None]))(engine))
    assert mixed[0].prompt == 2 and mixed[2].prompt == 1
    assert mixed[1] == RequestRefused("request 1 refused") and fine == [RequestRefused("request 3 refused")]
    assert engine.aborted == []
    assert [o.prompt for o in asyncio.run(asyncio.wait_for(loop.generate([1], [None]), TIMEOUT))] == [1]


def test_a_cancelled_batch_leaves_the_engine_before_its_call_ends():
    """A decode stage withdraws its offered KV once its call ends: by then the engine must no
    longer hold the requests that would load it."""
    engine = FakeEngine(seconds=0.01)
    loop = EngineLoop(lambda: engine)
    engine.gate.set()

    async def main():
        task = asyncio.ensure_future(loop.generate([1000, 1000], [None] * 2))
        while not engine.running:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        assert engine.aborted == ["0", "1"] and not engine.running and not engine.waiting
        return await asyncio.wait_for(loop.generate([1], [None]), TIMEOUT)

    assert [o.prompt for o in asyncio.run(main())] == [1]


def test_the_engine_is_built_and_stepped_in_the_loop_thread_alone():
    """On CPU each thread that runs torch ops gets an OpenMP team of its own; one thread builds
    and steps the engine so the process has just the one."""
    engine = FakeEngine()
    engine.gate.set()
    threads = []
    step = engine.step
    engine.step = lambda: threads.append(threading.current_thread().name) or step()

    def build():
        threads.append(threading.current_thread().name)
        return engine

    loop = EngineLoop(build)
    asyncio.run(asyncio.wait_for(loop.generate([2], [None]), TIMEOUT))
    assert set(threads) == {"engine-loop"} and len(threads) == 3


def test_an_engine_that_fails_to_build_fails_the_constructor():
    def build():
        raise RuntimeError("no memory for the KV cache")

    with pytest.raises(RuntimeError, match="no memory for the KV cache"):
        EngineLoop(build)


def test_the_clock_times_every_engine_step():
    """Steps of 20 ms: as many durations as steps, each at least that long."""
    engine = FakeEngine(max_seqs=4, seconds=0.02)
    clock = StepClock()
    loop = EngineLoop(lambda: engine, clock)
    asyncio.run(run(loop.generate([1, 3], [None] * 2))(engine))
    times = clock.take()
    assert times.steps == len(engine.per_step) == 3
    spread = times.step_seconds.spread()
    assert spread.count == 3 and 0.02 <= spread.mean <= spread.max < 1.0
    assert clock.take().steps == 0  # taken once
