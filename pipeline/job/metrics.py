"""_metrics.json: what a job reports about itself, typed. Built once at the end of a job
(pipeline/job/run.py) and serialised here only; the report, the bench and the capacity planner
read these types, never the JSON's keys."""

import json
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from typing import Any, Optional, get_args, get_origin, get_type_hints

import fsspec

from pipeline.engine.steps import Spread
from pipeline.io.storage import METRICS


@dataclass
class WorkerMetrics:
    """One worker's share of its pool's work."""

    worker: str  # the first characters of its Ray node id, and its pid
    node: str  # its Ray node id: a key of JobMetrics.nodes
    busy_seconds: float
    batches: int
    rows: int
    input_tokens: int
    output_tokens: int
    device: str = ""  # an engine worker's GPU or CPU model


@dataclass
class StageMetrics:
    """One pool's work, its workers' busy seconds summed."""

    busy_seconds: float
    rows: int
    input_tokens: int
    output_tokens: int
    # Copying KV out of and into the paged caches, encoding, decoding, files.
    kv_handoff_seconds: float
    workers: int  # every worker that ran, a replaced one too
    size: int  # the workers the pool runs at once
    worker_cores: list[list[int]]  # the cores each worker may run on
    per_worker: list[WorkerMetrics]
    # Engine pools (0 or None for the others, and in the metrics of an earlier kvrelay): engine
    # steps, the work's FLOPs and memory bytes (weights read per step, cache bytes), the steps'
    # durations and the gaps between a request's tokens, and the work against the devices' peaks.
    engine_steps: int = 0
    model_flops: float = 0.0
    memory_bytes: float = 0.0
    step_seconds: Optional[Spread] = None
    inter_token_seconds: Optional[Spread] = None
    utilisation: Optional["Utilisation"] = None

    @property
    def cores(self) -> set[int]:
        """Every core a worker of the pool may run on."""
        return {core for cores in self.worker_cores for core in cores}

    @property
    def cores_per_worker(self) -> float:
        """The cores a worker may run on, on average."""
        return sum(len(cores) for cores in self.worker_cores) / len(self.worker_cores)

    def rates(self) -> dict[str, float]:
        """Rows and tokens per second while busy: the pool's work over a worker's mean busy time."""
        busy = self.busy_seconds / self.size
        return {
            "rows_per_s": self.rows / busy,
            "prompt_tokens_per_s": self.input_tokens / busy,
            "output_tokens_per_s": self.output_tokens / busy,
        }


@dataclass
class Utilisation:
    """An engine pool's work per worker while busy, against one worker's devices' peak
    (pipeline/job/utilisation.py): how compute-bound, how bandwidth-bound."""

    device: str  # what the peak is of: a GPU, or a worker's cores
    flops_per_s: float
    bytes_per_s: float
    intensity: float  # FLOPs per byte of memory traffic
    peak_flops_per_s: Optional[float]  # None where the device's peak is unknown
    peak_bytes_per_s: Optional[float]
    compute_share: Optional[float]
    bandwidth_share: Optional[float]

    @property
    def ridge(self) -> Optional[float]:
        """The intensity above which the device is compute-bound rather than bandwidth-bound."""
        return self.peak_flops_per_s / self.peak_bytes_per_s if self.peak_flops_per_s else None


@dataclass
class ShardCounts:
    total: int
    resumed: int  # committed by an earlier run of the same job


@dataclass
class JobMetrics:
    mode: str
    phase: str
    model: str
    rows_in: int
    rows_out: int
    rows_errored: int
    errors: dict[str, int]  # rows by error kind
    input_tokens: int
    output_tokens: int
    shards: ShardCounts
    wall_seconds: float
    output_tokens_per_second: float
    stages: dict[str, StageMetrics]  # the pools that ran, in graph order
    kv_bytes_moved: int
    kv_recomputed_rows: int  # payloads lost or damaged whose prompts the decode pool prefilled again
    kv_bytes_per_prompt_token: Optional[float]
    kv_handoff_seconds: float
    # The price of the split, against the prefill compute it saves the decode pool.
    kv_handoff_share_of_prefill: Optional[float]
    # The wall time split at the engine pools' first batch start and last batch end (None when
    # every shard was committed earlier): start-up is Ray, the actors and loading the engines.
    startup_seconds: Optional[float]
    processing_seconds: Optional[float]
    object_store_peak_bytes: int
    nodes: dict[str, dict[str, float]]  # each node's Ray resources, by node id
    # Counts with a default read as 0 from the _metrics.json of an earlier kvrelay, which had none.
    # Times an engine preempted a request (its cache ran short), counted by the KV connector.
    preemptions: int = 0
    input_rows_decoded: int = 0  # Parquet rows the readers decoded, against rows_in
    late_duplicate_rows: int = 0  # rows a retried batch wrote again after their shard committed
    driver_bytes_received: int = 0  # what the driver took from the dataset: fragment names and row numbers
    # Shared prefixes (kv.shared_block_tokens): the shared blocks rows referenced, the distinct
    # ones stored (once per prefill worker that stored one), the fetches of decode workers (once
    # per worker while it holds the block), and the KV bytes that did not move because a decode
    # worker held the block.
    kv_blocks_referenced: int = 0
    kv_blocks_stored: int = 0
    kv_blocks_fetched: int = 0
    kv_bytes_saved: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "JobMetrics":
        """From _metrics.json's content, or one mode of a bench.json (whose other keys are left)."""
        return _build(cls, data)

    @classmethod
    def read(cls, url: str) -> "JobMetrics":
        """A finished job's _metrics.json, given the job's output URL."""
        with fsspec.open(f"{url.rstrip('/')}/{METRICS}") as f:
            return cls.from_dict(json.load(f))


def _build(kind: Any, value: Any) -> Any:
    """`value` as read from JSON, turned into `kind` (a dataclass, or a list, dict or Optional
    of them)."""
    if is_dataclass(kind):
        hints = get_type_hints(kind)
        return kind(
            **{
                f.name: _build(hints[f.name], value[f.name])
                for f in fields(kind)
                if f.name in value or f.default is MISSING
            }
        )
    origin, args = get_origin(kind), get_args(kind)
    if value is None:
        return None
    if origin is list:
        return [_build(args[0], v) for v in value]
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    if args and type(None) in args:  # Optional
        return _build(next(a for a in args if a is not type(None)), value)
    return value
