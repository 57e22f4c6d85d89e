"""Assembles the Ray Data graph for a mode and phase, and runs it:

read shards -> tokenize -> prefill pool -> (KV payload column) -> decode pool -> detokenize -> write
read shards -> tokenize -> colocated pool ---------------------------------> detokenize -> write
phase=prefill: read shards -> tokenize -> prefill pool -> write (a prefill dataset)
phase=decode:  read shards (a prefill dataset) -> decode pool -> detokenize -> write

The workers write the rows; the driver commits each shard once its rows are all written
(pipeline/commit.py). Shards already committed by an earlier run of the same job are not read
again.
"""
import hashlib
import json
import logging
import time
from pathlib import PurePosixPath
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import fsspec
import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy, ExecutionResources
from tqdm import tqdm

from pipeline.columns import (
    FINISH_REASON,
    GENERATED_TEXT,
    GENERATED_TOKENS,
    KV_PAYLOAD,
    NUM_INPUT_TOKENS,
    NUM_GENERATED_TOKENS,
    OUTPUT,
    PROMPT_TOKENS,
    STAGE_COLUMNS,
)
from pipeline.commit import ShardLedger
from pipeline.cluster import alive_nodes, check_schedulable, demands, start_ray
from pipeline.config import ClusterConfig, JobConfig, Mode, Phase, PoolConfig, Transport
from pipeline.errors import JobError
from pipeline.job_report import write_report
from pipeline.kv.transport import PayloadStore
from pipeline.metrics import BatchPoint, ObjectStorePeak, processing_window, start_sink
from pipeline.model import ResolvedModel, resolve_model
from pipeline.output import OutputTarget, ShardStats
from pipeline.placement import engine_pools, place_engines
from pipeline.source import UNIT, PromptSource, Shard
from pipeline.stages.colocated import Colocated
from pipeline.stages.decode import Decode
from pipeline.stages.detokenize import Detokenize
from pipeline.stages.engine_stage import EngineStage
from pipeline.stages.prefill import Prefill
from pipeline.stages.tokenize import Tokenize
from pipeline.stages.write import WriteFragments

log = logging.getLogger(__name__)

BLOCKS_PER_ENGINE_WORKER = 4
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class Stage:
    """One step of the graph: `fn` constructed with `constructor` in each actor of a
    fixed-size pool, fed pyarrow batches."""

    name: str
    fn: type
    actors: PoolConfig
    constructor: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def runs_engine(self) -> bool:
        return issubclass(self.fn, EngineStage)

    def apply(self, ds: ray.data.Dataset, batch_size: int | None) -> ray.data.Dataset:
        return ds.map_batches(
            self.fn,
            batch_size=batch_size,
            batch_format="pyarrow",
            # An async stage's calls (the engine stages') run on Ray Data's asyncio loop in the
            # actor, this many at once; a sync stage's, one at a time.
            compute=ActorPoolStrategy(
                size=self.actors.size, max_concurrent_calls_per_actor=self.actors.concurrent_batches
            ),
            num_cpus=self.actors.num_cpus,
            num_gpus=self.actors.num_gpus,
            fn_constructor_kwargs=self.constructor,
            resources=dict(self.actors.resources) or None,
            label_selector=dict(self.actors.label_selector) or None,
            runtime_env={"env_vars": self.env} if self.env else None,
            ray_remote_args_fn=partial(dict, max_restarts=self.actors.max_restarts),
        )


def plan(cfg: JobConfig, model: ResolvedModel, carried: list[str], sink: str, store: PayloadStore | None) -> list[Stage]:
    pools, placements = cfg.pools, place_engines(cfg)

    def engine(name: str, fn: type) -> Stage:
        constructor = dict(model=model, engine=cfg.engine, sampling=cfg.sampling, kv=cfg.kv, store=store,
                           pool=getattr(pools, name), placement=placements[name], sink_name=sink)  # fmt: skip
        return Stage(name, fn, getattr(pools, name), constructor, placements[name].env())

    tokenize = Stage("tokenize", Tokenize, pools.tokenize,
                     dict(model=model, input=cfg.input, max_tokens=cfg.sampling.max_tokens, sink_name=sink))  # fmt: skip
    detokenize = Stage("detokenize", Detokenize, pools.detokenize,
                       dict(model=model, id_column=cfg.input.id_column, carried=carried, sink_name=sink))  # fmt: skip
    if cfg.mode is Mode.colocated:
        return [tokenize, engine("colocated", Colocated), detokenize]
    if cfg.phase is Phase.prefill:
        return [tokenize, engine("prefill", Prefill)]
    if cfg.phase is Phase.decode:
        return [engine("decode", Decode), detokenize]
    return [tokenize, engine("prefill", Prefill), engine("decode", Decode), detokenize]


def build(source: PromptSource, shards: list[Shard], stages: list[Stage], output: OutputTarget,
          cluster: ClusterConfig, sink_name: str, kv_row_bytes: float) -> ray.data.Dataset:  # fmt: skip
    """The rows of `shards` through `stages`, written as fragments by the workers: the dataset's
    own rows are the fragments' names and row numbers."""
    # The process's context: set for every job, so that no job inherits an earlier one's limits.
    context = ray.data.DataContext.get_current()
    budget = cluster.object_store_budget_gib
    context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=budget * 2**30 if budget is not None else None
    )
    context.output_backpressure_guard_release_interval_s = cluster.backpressure_release_s
    reader = source.reader(shards, sink_name)
    ds = ray.data.from_items([{UNIT: i} for i in reader.units], override_num_blocks=len(reader.units))
    ds = ds.map_batches(reader, batch_size=1, batch_format="pyarrow", num_cpus=cluster.io_num_cpus)
    # The cut is an op of its own that reserves a whole CPU while it runs (Ray Data offers no
    # way to lower it).
    rows = block_rows(shards, stages, kv_row_bytes)
    ds = ds.repartition(target_num_rows_per_block=rows)
    for stage in stages:  # an engine worker takes each block whole
        ds = stage.apply(ds, rows if stage.runs_engine else stage.actors.batch_size)
    starts = np.array([s.first_row for s in shards], np.int64)
    folder = output.fs.unstrip_protocol(output.fragments())  # a URL: the workers open it on the output's store
    # Writers are actors, as many as the last stage's workers, reserving no CPU (as the commit
    # tasks): a task op at the end of the graph got no share of Ray Data's resource budget until
    # every other op was done, and with the cut above holding a whole CPU, a writer that reserved
    # any stalled the pipeline on a small machine.
    return ds.map_batches(
        WriteFragments,
        fn_constructor_kwargs=dict(folder=folder, starts=starts, shards=np.array([s.index for s in shards], np.int64)),
        batch_size=None,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=stages[-1].actors.size),
        num_cpus=0,
    )


def block_rows(shards: list[Shard], stages: list[Stage], kv_row_bytes: float) -> int:
    """Rows per block, as the read is cut, and per call of an engine worker. Ray Data's cost is
    mostly per block: as many rows as a shard (the unit of commit, which a block never needs to
    exceed), but few enough that each engine worker gets several blocks and the last ones
    spread over them, and, where KV leaves a stage (`kv_row_bytes` a row), that a block's KV
    stays within Ray Data's block size (DataContext.target_max_block_size). Never fewer than
    an engine pool's batch_size: the rows that keep its engine full."""
    engines = [s.actors for s in stages if s.runs_engine]
    rows = sum(s.num_rows for s in shards)
    spread = -(-rows // (BLOCKS_PER_ENGINE_WORKER * sum(pool.size for pool in engines)))
    fits = int(ray.data.DataContext.get_current().target_max_block_size // kv_row_bytes) if kv_row_bytes else rows
    return max(min(max(s.num_rows for s in shards), spread, fits), max(pool.batch_size for pool in engines))


def kv_row_bytes(cfg: JobConfig, source: PromptSource, model: ResolvedModel) -> float:
    """The KV a row's prompt makes, estimated before the job runs from the first rows' prompts
    (about 4 bytes of text or token ids a token); none colocated."""
    if cfg.mode is Mode.colocated:
        return 0
    prompts = PROMPT_TOKENS if cfg.phase is Phase.decode else cfg.input.prompt_column
    return model.kv_bytes_per_token * (source.sampled_bytes_per_row(prompts) / BYTES_PER_TOKEN + 1)


def commit(ds: ray.data.Dataset, ledger: ShardLedger, total_rows: int) -> None:
    """Has each shard committed once the workers have written all its rows; only fragment names
    and row numbers reach the driver. The bar shows rows committed of all, and output tokens/s
    since the pipeline started."""
    started = time.perf_counter()
    with tqdm(total=total_rows, unit="row", desc="committed", dynamic_ncols=True) as progress:
        for fragments in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ledger.add(fragments)
            # Tokens counted as rows are written, not as their shard commits, so the rate moves between commits.
            rate = ledger.output_tokens / (time.perf_counter() - started)
            progress.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
            progress.update(ledger.committed())
        progress.update(ledger.committed(wait=True))
    if ledger.missing():
        raise JobError(f"the pipeline ended without every row of shards {ledger.missing()}; rerun to finish them")


def identity(cfg: JobConfig, source: PromptSource, model: ResolvedModel) -> dict:
    """What must be equal for a rerun to resume into the same output: everything that decides
    which rows exist and what is generated for them, not how the work is spread."""
    job = {
        "phase": cfg.phase.value,
        "input": source.fingerprint(),
        "prompts": {k: v for k, v in asdict(cfg.input).items() if k != "path"},
        "model": model.fingerprint,
        "model_dtype": cfg.model.dtype,
        "max_model_len": cfg.model.max_model_len,
        "sampling": asdict(cfg.sampling),
        "kv_codec": cfg.kv.codec.value,
        "kv_on_load_failure": cfg.kv.on_load_failure.value,
        "shard_rows": cfg.output.shard_rows,
    }
    return json.loads(json.dumps(job))  # as the manifest will read back


def run(cfg: JobConfig) -> dict:
    """Runs one job to completion (or finishes a crashed run of it); returns the metrics also
    written to metrics.json, beside report.md and report.png. Every check comes before the
    output is touched."""
    started, started_at = time.perf_counter(), time.time()
    if cfg.phase is not Phase.generate and cfg.mode is Mode.colocated:
        raise JobError(f"a {cfg.phase.value} job is one half of mode=disaggregated, not of mode=colocated")
    if cfg.kv.transport is Transport.storage and not cfg.kv.storage_path:
        raise JobError("kv.transport=storage needs kv.storage_path (an fsspec URL every worker can reach)")
    check_tensor_parallel(cfg)
    check_apart(cfg.input.path, cfg.output.path)
    source = PromptSource(cfg.input, cfg.output.shard_rows, _needs(cfg), _reserved(cfg))
    model = resolve_model(cfg.model)
    job = identity(cfg, source, model)
    output = OutputTarget(cfg.output, job)
    done = output.inspect()
    store = PayloadStore(cfg.kv.storage_path, _digest(job)) if cfg.kv.storage_path else None
    stage_metrics, timeline, counts, peak, nodes, clock_zero = {}, [], {}, ObjectStorePeak(), [], started_at
    local, sink = None, None
    try:
        if len(done) < len(source.shards):
            local = start_ray(cfg.cluster)
            nodes = alive_nodes()
            sink_name, sink = start_sink()
            carried = [c for c in source.schema.names if c not in STAGE_COLUMNS]
            graph = plan(cfg, model, carried, sink_name, store)
            check_schedulable(demands({s.name: s.actors for s in graph}, cfg.cluster.io_num_cpus), nodes)
        lease, done = output.claim()
        with lease:
            todo = [s for s in source.shards if s.index not in done]
            ledger = None
            if todo:
                # A payload file goes once its row is committed (in a prefill dataset, it is kept).
                removes = store if not cfg.kv.keep_files and cfg.phase is not Phase.prefill else None
                ledger = ShardLedger(output, todo, removes)
                with peak:
                    ds = build(source, todo, graph, output, cfg.cluster, sink_name, kv_row_bytes(cfg, source, model))
                    commit(ds, ledger, sum(s.num_rows for s in todo))
                stage_metrics, timeline, counts, clock_zero = ray.get(
                    [sink.stages.remote(), sink.timeline.remote(), sink.counts.remote(), sink.started.remote()]
                )
            if store and not cfg.kv.keep_files and cfg.phase is Phase.generate:
                store.remove_job()
            written = output.resumed + ledger.stats if ledger else output.resumed
            if written.rows != source.num_rows:
                raise JobError(f"the output holds {written.rows} rows of the input's {source.num_rows}; rerun to finish")
            shards = {"total": len(source.shards), "resumed": len(done)}
            metrics = summarize(cfg, source.num_rows, written, stage_metrics, shards, time.perf_counter() - started)
            metrics.update(_window(timeline, list(engine_pools(cfg)), clock_zero - started_at))
            metrics["input_rows_decoded"] = counts.get("input_rows_decoded", 0)
            metrics["late_duplicate_rows"] = ledger.late_duplicate_rows if ledger else 0
            metrics["driver_bytes_received"] = ledger.bytes_received if ledger else 0
            metrics["object_store_peak_bytes"] = peak.peak
            metrics["nodes"] = {node.id: node.resources for node in nodes}  # where stages.*.per_worker ran
            write_report(output, metrics, timeline)  # before finish: _SUCCESS stays the last file written
            output.finish(metrics)
    finally:
        if sink:
            ray.kill(sink)
        if local:  # a test cluster of this job's own: its nodes go with it
            ray.shutdown()
            local.shutdown()
    return metrics


def check_apart(input_url: str, output_url: str) -> None:
    """The output must be neither the input, nor inside it (a rerun would read it back as rows),
    nor around it (overwriting would remove it)."""
    fs_in, path_in = fsspec.core.url_to_fs(input_url)
    fs_out, path_out = fsspec.core.url_to_fs(output_url)
    if "memory" in fs_out.protocol:  # fsspec's memory:// lives in one process; the workers write the output
        raise JobError(f"output.path {output_url} is in this process's memory, out of the workers' reach")
    if fs_in.protocol != fs_out.protocol:
        return
    a, b = PurePosixPath(path_in.rstrip("/")), PurePosixPath(path_out.rstrip("/"))
    if a == b or a in b.parents or b in a.parents:
        raise JobError(f"output.path {output_url} and input.path {input_url} overlap; write the output elsewhere")


def check_tensor_parallel(cfg: JobConfig) -> None:
    """A tensor-parallel engine runs one process per GPU, so each engine worker must hold that
    many; and its KV is split across those processes, out of the stage's reach."""
    tp = cfg.engine.tensor_parallel_size
    if tp == 1:
        return
    if cfg.mode is Mode.disaggregated:
        raise JobError(
            f"engine.tensor_parallel_size={tp} needs mode=colocated: the KV handoff reads and writes the cache "
            "in the engine's own process, which tensor parallelism splits; use GPUs that hold the model alone"
        )
    if cfg.engine.device == "cpu" or cfg.pools.colocated.num_gpus < tp:
        raise JobError(
            f"engine.tensor_parallel_size={tp} needs engine.device=cuda and pools.colocated.num_gpus={tp} "
            f"(each worker holds its engine's GPUs; it has {cfg.pools.colocated.num_gpus:g})"
        )


def _window(timeline: list[BatchPoint], engines: list[str], clock_offset: float) -> dict:
    """The job's wall time split at its engine pools' first batch start and last batch end:
    start-up (Ray, the actors, loading the engines) and processing; what follows is the tail
    (the last rows through detokenize, commits, the report). `clock_offset`: the timeline's
    zero in seconds since the job started (the sink starts once Ray is up)."""
    window = processing_window(timeline, engines)
    if window is None:  # nothing ran: every shard was committed earlier
        return {"startup_seconds": None, "processing_seconds": None}
    start, end = window
    return {"startup_seconds": round(clock_offset + start, 3), "processing_seconds": round(end - start, 3)}


def _needs(cfg: JobConfig) -> tuple[str, ...]:
    if cfg.phase is Phase.decode:  # a prefill dataset
        return (PROMPT_TOKENS, GENERATED_TOKENS, NUM_INPUT_TOKENS, FINISH_REASON, KV_PAYLOAD)
    return (cfg.input.prompt_column,)


def _reserved(cfg: JobConfig) -> tuple[str, ...]:
    """Column names the job writes, which input columns must not take: the output contract's
    (but the id column, carried as `id`), and for a prompt dataset the columns stages add (a
    prefill dataset has those already)."""
    written = OUTPUT if cfg.phase is not Phase.decode else (GENERATED_TEXT, NUM_GENERATED_TOKENS)
    names = written + (STAGE_COLUMNS if cfg.phase is not Phase.decode else ())
    return tuple(n for n in names if n != cfg.input.id_column)


def _digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def summarize(cfg: JobConfig, rows_in: int, written: ShardStats, stages: dict, shards: dict, wall: float) -> dict:
    moved = stages.get("decode", stages.get("prefill", {}))
    kv_bytes, kv_tokens = moved.get("kv_bytes", 0), moved.get("kv_tokens", 0)
    handoff = sum(s.get("kv_handoff_seconds", 0.0) for s in stages.values())
    prefill_busy = stages.get("prefill", {}).get("busy_seconds", 0.0)
    return {
        "mode": cfg.mode.value,
        "phase": cfg.phase.value,
        "model": cfg.model.name,
        "rows_in": rows_in,
        "rows_out": written.rows,
        "rows_errored": written.rows_errored,
        "errors": written.errors,
        "input_tokens": written.input_tokens,
        "output_tokens": written.output_tokens,
        "shards": shards,
        "wall_seconds": round(wall, 3),
        "output_tokens_per_second": round(written.output_tokens / wall, 2),
        "stages": {
            name: {"busy_seconds": s["busy_seconds"], "rows": s["rows"], "input_tokens": s["input_tokens"],
                   "output_tokens": s["output_tokens"], "kv_handoff_seconds": s.get("kv_handoff_seconds", 0.0),
                   "workers": len(s["worker_cores"]), "size": getattr(cfg.pools, name).size,
                   "worker_cores": s["worker_cores"], "per_worker": s["per_worker"]}
            for name, s in stages.items()
        },  # fmt: skip
        "kv_bytes_moved": kv_bytes,
        "kv_recomputed_rows": moved.get("kv_recomputed", 0),
        "preemptions": sum(s.get("preempted", 0) for s in stages.values()),
        "kv_bytes_per_prompt_token": kv_bytes / kv_tokens if kv_tokens else None,
        # Copying KV out of and into the paged caches, encoding, decoding, files: the price of the
        # split, against the prefill compute it saves the decode pool.
        "kv_handoff_seconds": round(handoff, 3),
        "kv_handoff_share_of_prefill": round(handoff / prefill_busy, 4) if prefill_busy else None,
    }
