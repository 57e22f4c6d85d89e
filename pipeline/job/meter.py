"""Metering while a job runs: stages report each batch to one named actor (the sink); the
driver reads its totals at the end and makes them the job's metrics (pipeline/job/metrics.py).

A stage waits for its report to land (one small round trip per batch), so when the dataset
is done, so are its metrics."""

import os
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, fields
from typing import AsyncIterator, Collection, Iterator, NamedTuple

import ray

from pipeline.cluster import on_driver_node
from pipeline.engine.steps import Histogram
from pipeline.job.metrics import WorkerMetrics


@dataclass
class BatchReport:
    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    kv_bytes: int = 0
    kv_tokens: int = 0
    kv_recomputed: int = 0
    # Shared prefixes (pipeline/kv/blocks.py): blocks rows named, blocks stored, blocks a decode
    # worker fetched, and the bytes of named blocks a decode worker did not fetch (it held them).
    kv_blocks_referenced: int = 0
    kv_blocks_stored: int = 0
    kv_blocks_fetched: int = 0
    kv_bytes_saved: int = 0
    # Times the engine preempted one of the batch's requests (its cache ran short): the request
    # lost its blocks, and computed or loaded its KV again when it resumed. Counted by the KV
    # connector (vLLM's own count needs its stats on), so a colocated engine reports none.
    preempted: int = 0
    kv_handoff_seconds: float = 0.0
    # Engine stages: the work's FLOPs and memory bytes (pipeline/engine/work.py: the cache's per
    # request, the weights per step), and the engine's steps since its last batch ended
    # (pipeline/engine/steps.py).
    model_flops: float = 0.0
    memory_bytes: float = 0.0
    engine_steps: int = 0
    step_seconds: Histogram = field(default_factory=Histogram)
    inter_token_seconds: Histogram = field(default_factory=Histogram)

    def add(self, other: "BatchReport") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class BatchPoint(NamedTuple):
    """One batch in the job's time series: when it ended (seconds since the sink started, on
    the sink's clock, so all stages share one), how long it took from its start (batches of an
    engine worker overlap), what went through."""

    stage: str
    end: float
    seconds: float
    rows: int
    input_tokens: int
    output_tokens: int


@dataclass
class StageTotals:
    """A stage's batches summed, as the sink keeps them."""

    work: BatchReport = field(default_factory=BatchReport)
    busy_seconds: float = 0.0
    batches: int = 0
    workers: dict[str, WorkerMetrics] = field(default_factory=dict)  # by worker name, in the order they joined
    worker_cores: list[list[int]] = field(default_factory=list)


class StageTally:
    """What the sink keeps: per-stage totals, each worker's node, cores and share of the work,
    and one BatchPoint per batch. A plain class (MetricsSink is it as a Ray actor), so it is
    testable without Ray."""

    def __init__(self) -> None:
        self._started = time.time()
        self._stages: dict[str, StageTotals] = defaultdict(StageTotals)
        self._timeline: list[BatchPoint] = []
        self._counts: dict[str, int] = defaultdict(int)

    def count(self, name: str, value: int) -> None:
        """Adds to a job-wide count kept outside any stage (e.g. input rows decoded)."""
        self._counts[name] += value

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def join(self, stage: str, worker: str, node: str, cores: list[int], device: str = "") -> None:
        totals = self._stages[stage]
        totals.workers[worker] = WorkerMetrics(worker, node, 0.0, 0, 0, 0, 0, device)
        totals.worker_cores.append(cores)

    def record(self, stage: str, worker: str, seconds: float, busy_seconds: float, report: BatchReport) -> None:
        """`seconds`: the batch from start to end; `busy_seconds`: the worker's busy time it
        accounts for (less where it overlapped the worker's other batches; see BusyClock)."""
        totals, mine = self._stages[stage], self._stages[stage].workers[worker]
        totals.work.add(report)
        totals.busy_seconds += busy_seconds
        totals.batches += 1
        mine.busy_seconds += busy_seconds
        mine.batches += 1
        mine.rows += report.rows
        mine.input_tokens += report.input_tokens
        mine.output_tokens += report.output_tokens
        # A stage reports right after its batch, so arrival on this one clock is the batch's end.
        end = round(time.time() - self._started, 3)
        self._timeline.append(
            BatchPoint(stage, end, round(seconds, 3), report.rows, report.input_tokens, report.output_tokens)
        )

    def stages(self) -> dict[str, StageTotals]:
        return dict(self._stages)

    def timeline(self) -> list[BatchPoint]:
        """Every batch so far, in the order the sink received them."""
        return self._timeline

    def started(self) -> float:
        """When the timeline's clock reads 0, as a Unix time."""
        return self._started


def processing_window(timeline: list[BatchPoint], stages: Collection[str]) -> tuple[float, float] | None:
    """From the first start to the last end of the batches of `stages`, on the timeline's clock;
    None if they ran none. Over the engine pools, it leaves out their start-up: a pool's first
    batch starts once its engine is up."""
    points = [p for p in timeline if p.stage in stages]
    if not points:
        return None
    return min(p.end - p.seconds for p in points), max(p.end for p in points)


MetricsSink = ray.remote(num_cpus=0)(StageTally)


def start_sink() -> tuple[str, ray.actor.ActorHandle]:
    """A fresh sink and the name stages find it by; it lives as long as the handle."""
    name = f"kvrelay-metrics-{uuid.uuid4().hex[:8]}"
    return name, MetricsSink.options(name=name, **on_driver_node()).remote()


class BusyClock:
    """A worker's busy time: while at least one batch is in hand. Each batch that ends takes
    the busy time since the last one ended (or since the worker became busy), so batches that
    overlap count their common time once, and the shares add up to the busy time. One batch at
    a time, a batch's share is its own duration."""

    def __init__(self) -> None:
        self._batches = 0
        self._since = 0.0

    def start(self) -> None:
        if self._batches == 0:
            self._since = time.perf_counter()
        self._batches += 1

    def stop(self) -> float:
        now = time.perf_counter()
        share, self._since = now - self._since, now
        self._batches -= 1
        return share


@dataclass
class StageMeter:
    """Used inside a stage actor: times each batch and reports it. A stage's calls run in one
    thread (Ray Data's asyncio loop, for a stage that works on several batches at once)."""

    stage: str
    sink_name: str
    device: str = ""  # an engine stage's: what its engine runs on
    _sink: ray.actor.ActorHandle = field(init=False)
    _worker: str = field(init=False)
    _busy: BusyClock = field(init=False, default_factory=BusyClock)

    def __post_init__(self) -> None:
        self._sink = ray.get_actor(self.sink_name)
        node = ray.get_runtime_context().get_node_id()
        self._worker = f"{node[:8]}:{os.getpid()}"
        cores = sorted(os.sched_getaffinity(0))
        ray.get(self._sink.join.remote(self.stage, self._worker, node, cores, self.device))

    @contextmanager
    def batch(self) -> Iterator[BatchReport]:
        """Times and reports one batch of a stage that works on one at a time."""
        with self._timed() as timed:
            yield timed.report
        ray.get(self._record(timed))

    @asynccontextmanager
    async def overlapping_batch(self) -> AsyncIterator[BatchReport]:
        """The same for a stage that works on several batches at once (a failed batch is not
        reported: its retry will be)."""
        with self._timed() as timed:
            yield timed.report
        await self._record(timed)

    @contextmanager
    def _timed(self) -> Iterator["_TimedBatch"]:
        timed = _TimedBatch(BatchReport(), time.perf_counter())
        self._busy.start()
        try:
            yield timed
        finally:
            timed.busy = self._busy.stop()

    def _record(self, timed: "_TimedBatch") -> ray.ObjectRef:
        seconds = time.perf_counter() - timed.start
        return self._sink.record.remote(self.stage, self._worker, seconds, timed.busy, timed.report)


@dataclass
class _TimedBatch:
    report: BatchReport
    start: float
    busy: float = 0.0
