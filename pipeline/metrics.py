"""Job metrics: stages report each batch to one named actor; the driver summarises at the end.

A stage waits for its report to land (one small round trip per batch), so when the dataset
is done, so are its metrics."""
import os
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import ray


@dataclass
class BatchReport:
    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    kv_bytes: int = 0
    kv_tokens: int = 0
    kv_recomputed: int = 0
    kv_handoff_seconds: float = 0.0


class BatchPoint(NamedTuple):
    """One batch in the job's time series: when it ended (seconds since the sink started, on
    the sink's clock, so all stages share one), how long it took, what went through."""

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

    def join(self, stage: str, worker: str, node: str, cores: list[int]) -> None:
        self._workers[stage][worker] = {"node": node, "cores": cores, **dict.fromkeys(WORKER_TOTALS, 0)}

    def record(self, stage: str, worker: str, seconds: float, report: BatchReport) -> None:
        totals, mine = self._stages[stage], self._workers[stage][worker]
        for counts in (totals, mine):
            counts["busy_seconds"] += seconds
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


def _rounded(counts: dict) -> dict:
    return {k: (round(v, 3) if k.endswith("seconds") else int(v)) for k, v in counts.items()}


MetricsSink = ray.remote(num_cpus=0)(StageTally)


def start_sink() -> tuple[str, ray.actor.ActorHandle]:
    """A fresh sink and the name stages find it by; it lives as long as the handle."""
    name = f"kvrelay-metrics-{uuid.uuid4().hex[:8]}"
    return name, MetricsSink.options(name=name).remote()


@dataclass
class StageMeter:
    """Used inside a stage actor: times each batch and reports it."""

    stage: str
    sink_name: str
    _sink: ray.actor.ActorHandle = field(init=False)
    _worker: str = field(init=False)

    def __post_init__(self) -> None:
        self._sink = ray.get_actor(self.sink_name)
        node = ray.get_runtime_context().get_node_id()
        self._worker = f"{node[:8]}:{os.getpid()}"
        ray.get(self._sink.join.remote(self.stage, self._worker, node, sorted(os.sched_getaffinity(0))))

    @contextmanager
    def batch(self) -> Iterator[BatchReport]:
        report = BatchReport()
        start = time.perf_counter()
        yield report
        ray.get(self._sink.record.remote(self.stage, self._worker, time.perf_counter() - start, report))


class ObjectStorePeak:
    """The most object-store memory the cluster held while the job ran, sampled twice a second
    (the figure `ray memory --stats-only` prints; Ray has no public call for it)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "ObjectStorePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while True:
            self.bytes = max(self.bytes, get_memory_info_reply(state).store_stats.object_store_bytes_used)
            if self._stop.wait(self.interval):
                return
