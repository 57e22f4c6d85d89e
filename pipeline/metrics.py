"""Job metrics: stages report each batch to one named actor; the driver summarises at the end.

A stage waits for its report to land (one small round trip per batch), so when the dataset
is done, so are its metrics."""
import os
import threading
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Collection, Iterator, NamedTuple

import psutil
import ray


@dataclass
class BatchReport:
    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    kv_bytes: int = 0
    kv_tokens: int = 0
    kv_recomputed: int = 0
    # Times the engine preempted one of the batch's requests (its cache ran short): the request
    # lost its blocks, and computed or loaded its KV again when it resumed. Counted by the KV
    # connector (vLLM's own count needs its stats on), so a colocated engine reports none.
    preempted: int = 0
    kv_handoff_seconds: float = 0.0


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


WORKER_TOTALS = ("busy_seconds", "batches", "rows", "input_tokens", "output_tokens")


class StageTally:
    """What the sink keeps: per-stage totals, each worker's node, cores and share of the work,
    and one BatchPoint per batch. A plain class (MetricsSink is it as a Ray actor), so it is
    testable without Ray."""

    def __init__(self) -> None:
        self._started = time.time()
        self._stages: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        self._workers: dict[str, dict[str, dict]] = defaultdict(dict)
        self._timeline: list[BatchPoint] = []
        self._counts: dict[str, int] = defaultdict(int)

    def count(self, name: str, value: int) -> None:
        """Adds to a job-wide count kept outside any stage (e.g. input rows decoded)."""
        self._counts[name] += value

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def join(self, stage: str, worker: str, node: str, cores: list[int]) -> None:
        self._workers[stage][worker] = {"node": node, "cores": cores, **dict.fromkeys(WORKER_TOTALS, 0)}

    def record(self, stage: str, worker: str, seconds: float, busy_seconds: float, report: BatchReport) -> None:
        """`seconds`: the batch from start to end; `busy_seconds`: the worker's busy time it
        accounts for (less where it overlapped the worker's other batches; see BusyClock)."""
        totals, mine = self._stages[stage], self._workers[stage][worker]
        for counts in (totals, mine):
            counts["busy_seconds"] += busy_seconds
            counts["batches"] += 1
        for name, value in vars(report).items():
            totals[name] += value
            if name in WORKER_TOTALS:
                mine[name] += value
        # A stage reports right after its batch, so arrival on this one clock is the batch's end.
        end = round(time.time() - self._started, 3)
        self._timeline.append(
            BatchPoint(stage, end, round(seconds, 3), report.rows, report.input_tokens, report.output_tokens)
        )

    def stages(self) -> dict[str, dict]:
        """Per stage: busy seconds, batches, the BatchReport sums, the cores each worker may run
        on, and per worker (node id prefix and pid) its node id, busy seconds, batches, rows and
        tokens."""
        return {
            stage: {
                **_rounded(totals),
                "worker_cores": [w["cores"] for w in self._workers[stage].values()],
                "per_worker": [
                    {"worker": name, "node": w["node"], **_rounded({k: w[k] for k in WORKER_TOTALS})}
                    for name, w in self._workers[stage].items()
                ],
            }
            for stage, totals in self._stages.items()
        }

    def timeline(self) -> list[BatchPoint]:
        """Every batch so far, in the order the sink received them."""
        return self._timeline

    def started(self) -> float:
        """When the timeline's clock reads 0, as a Unix time."""
        return self._started


def _rounded(counts: dict) -> dict:
    return {k: (round(v, 3) if k.endswith("seconds") else int(v)) for k, v in counts.items()}


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
    return name, MetricsSink.options(name=name).remote()


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
    _sink: ray.actor.ActorHandle = field(init=False)
    _worker: str = field(init=False)
    _busy: BusyClock = field(init=False, default_factory=BusyClock)

    def __post_init__(self) -> None:
        self._sink = ray.get_actor(self.sink_name)
        node = ray.get_runtime_context().get_node_id()
        self._worker = f"{node[:8]}:{os.getpid()}"
        ray.get(self._sink.join.remote(self.stage, self._worker, node, sorted(os.sched_getaffinity(0))))

    @contextmanager
    def batch(self) -> Iterator[BatchReport]:
        """Times and reports one batch of a stage that works on one at a time."""
        report, start = BatchReport(), time.perf_counter()
        self._busy.start()
        try:
            yield report
        finally:
            busy = self._busy.stop()
        ray.get(self._record(start, busy, report))

    @asynccontextmanager
    async def overlapping_batch(self) -> AsyncIterator[BatchReport]:
        """The same for a stage that works on several batches at once (a failed batch is not
        reported: its retry will be)."""
        report, start = BatchReport(), time.perf_counter()
        self._busy.start()
        try:
            yield report
        finally:
            busy = self._busy.stop()
        await self._record(start, busy, report)

    def _record(self, start: float, busy: float, report: BatchReport) -> ray.ObjectRef:
        return self._sink.record.remote(self.stage, self._worker, time.perf_counter() - start, busy, report)


class PeakSampler:
    """The largest sample taken while the `with` block ran, twice a second, in a background
    thread (the job's own threads keep running); a subclass says how to take one."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def measurer(self) -> Callable[[], int]:
        """Called once, in the sampling thread: the function that takes one sample."""
        raise NotImplementedError

    def _sample(self) -> None:
        measure = self.measurer()
        while True:
            self.peak = max(self.peak, measure())
            if self._stop.wait(self.interval):
                return


class ObjectStorePeak(PeakSampler):
    """The most object-store memory the cluster held while the job ran (the figure
    `ray memory --stats-only` prints; Ray has no public call for it)."""

    def measurer(self) -> Callable[[], int]:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return lambda: get_memory_info_reply(state).store_stats.object_store_bytes_used


class ProcessTreeRSSPeak(PeakSampler):
    """The most resident memory this process and all its descendants held at once: with Ray
    started in-process, its raylet and so every worker are descendants. RSS counts a shared
    page (shared libraries, the object store's shared memory) once in each process that maps
    it, so the sum is an upper bound."""

    def measurer(self) -> Callable[[], int]:
        root = psutil.Process()
        return lambda: tree_rss(root)


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of `root` and its descendants, summed."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # it ended between listing and reading
            pass
    return total


class ProcessTreeCPU(PeakSampler):
    """CPU seconds (user and system) this process and all its descendants used while the `with`
    block ran, counting each process as last seen (a worker that ended keeps its last sample),
    in milliseconds. The driver's own share is `time.process_time()` over the same span."""

    def measurer(self) -> Callable[[], int]:
        root, seen = psutil.Process(), {}

        def measure() -> int:
            for process in [root, *root.children(recursive=True)]:
                try:
                    times = process.cpu_times()
                    seen[process.pid] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            return int(1000 * sum(seen.values()))

        before = measure()
        return lambda: measure() - before
