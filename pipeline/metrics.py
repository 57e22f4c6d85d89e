"""Job metrics: stages report each batch to one named actor; the driver summarises at the end.

Reports are fire-and-forget, so metering costs a stage one small message per batch."""
import os
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import ray


@dataclass
class BatchReport:
    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    kv_bytes: int = 0
    kv_tokens: int = 0


@ray.remote(num_cpus=0)
class MetricsSink:
    def __init__(self) -> None:
        self._stages: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        self._workers: dict[str, set] = defaultdict(set)

    def record(self, stage: str, worker: str, seconds: float, report: BatchReport) -> None:
        totals = self._stages[stage]
        totals["busy_seconds"] += seconds
        totals["batches"] += 1
        for name, value in vars(report).items():
            totals[name] += value
        self._workers[stage].add(worker)

    def stages(self) -> dict[str, dict]:
        return {
            stage: {**{k: (round(v, 3) if k == "busy_seconds" else int(v)) for k, v in totals.items()},
                    "workers": len(self._workers[stage])}
            for stage, totals in self._stages.items()
        }


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
        self._worker = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"

    @contextmanager
    def batch(self) -> Iterator[BatchReport]:
        report = BatchReport()
        start = time.perf_counter()
        yield report
        self._sink.record.remote(self.stage, self._worker, time.perf_counter() - start, report)
