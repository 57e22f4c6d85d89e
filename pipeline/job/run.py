"""Runs one job: checks it, builds its graph (pipeline/job/graph.py), has the driver commit the
shards the workers write, and writes _metrics.json and the report.

The workers write the rows; the driver commits each shard once its rows are all written
(pipeline/io/commit.py). Shards already committed by an earlier run of the same job are not read
again.
"""

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace

import ray
import ray.data
from tqdm import tqdm

from pipeline.cluster import alive_nodes, check_schedulable, demands, start_ray
from pipeline.columns import (
    ERROR_KIND,
    FINISH_REASON,
    GENERATED_TEXT,
    GENERATED_TOKENS,
    KV_PAYLOAD,
    LOGPROBS,
    NUM_GENERATED_TOKENS,
    NUM_INPUT_TOKENS,
    OUTPUT,
    PROMPT_TOKENS,
    STAGE_COLUMNS,
)
from pipeline.config import ENGINE_POOLS, EngineConfig, JobConfig, OutputFormat, Phase
from pipeline.engine.model import ResolvedModel, load_tokenizer, resolve_model
from pipeline.engine.sampling import RowSampling
from pipeline.errors import JobUnfinished
from pipeline.io.commit import ShardLedger
from pipeline.io.openai_requests import Served
from pipeline.io.openai_results import ResultFormat, write_results
from pipeline.io.output import OutputTarget
from pipeline.io.source import PromptSource
from pipeline.io.storage import REPORT_PLOT
from pipeline.job.graph import Stage, build_dataset, build_stages, kv_row_bytes, needs_block_registry
from pipeline.job.meter import BatchPoint, StageTotals, processing_window, start_sink
from pipeline.job.metrics import JobMetrics, ShardCounts, StageMetrics
from pipeline.job.report import write_plot, write_report
from pipeline.job.usage import ObjectStorePeak
from pipeline.job.utilisation import pool_utilisation
from pipeline.job.validate import check_handoff, check_job
from pipeline.kv.blocks import start_registry
from pipeline.kv.store import PayloadStore

log = logging.getLogger(__name__)


def run(cfg: JobConfig) -> JobMetrics:
    """Runs one job to completion (or finishes a crashed run of it); returns the metrics also
    written to _metrics.json, beside _report.md and _report.png. Every check comes before the
    output is touched."""
    started, started_at = time.perf_counter(), time.time()
    check_job(cfg)
    source = PromptSource(cfg.input, cfg.output.shard_rows, needs(cfg), reserved(cfg), served_models(cfg))
    cfg = replace(cfg, input=source.cfg)  # OpenAI Batch files: the columns their rows have
    model = resolve_model(cfg.model, cfg.engine)
    check_handoff(cfg, model)
    sampling = RowSampling.of(cfg.sampling, cfg.input.sampling_column, source.schema)
    job = identity(cfg, source, model)
    output = OutputTarget(cfg.output, job)
    done = output.inspect()
    store = payload_store(cfg, job, output)
    removes = store if store and removes_files(cfg) else None
    totals, timeline, counts, peak, nodes, clock_zero = {}, [], {}, ObjectStorePeak(), [], started_at
    local, sink, registry, graph = None, None, None, []
    try:
        if len(done) < len(source.shards):
            local = start_ray(cfg.cluster)
            nodes = alive_nodes()
            sink_name, sink = start_sink()
            registry_name, registry = start_registry() if needs_block_registry(cfg) else (None, None)
            carried = [c for c in source.schema.names if c not in STAGE_COLUMNS]
            graph = build_stages(cfg, model, carried, sink_name, store, sampling, registry_name)
            check_schedulable(demands({s.name: s.actors for s in graph}, cfg.cluster.io_num_cpus), nodes)
        lease, done = output.claim()
        with lease:
            todo = [s for s in source.shards if s.index not in done]
            ledger = None
            if todo:
                ledger = ShardLedger(output, todo, removes, lease)
                with peak:
                    ds = build_dataset(
                        source,
                        todo,
                        graph,
                        output,
                        cfg.cluster,
                        sink_name,
                        kv_row_bytes(cfg, source, model),
                        needs(cfg)[0] if cfg.input.order_by_prefix else None,
                    )
                    commit(ds, ledger, sum(s.num_rows for s in todo))
                totals, timeline, counts, clock_zero = ray.get(
                    [sink.stages.remote(), sink.timeline.remote(), sink.counts.remote(), sink.started.remote()]
                )
            if removes and cfg.phase is Phase.generate:
                removes.remove_job()
            written = output.resumed + ledger.stats if ledger else output.resumed
            if written.rows != source.num_rows:
                raise JobUnfinished(
                    f"the output holds {written.rows} rows of the input's {source.num_rows}; rerun to finish"
                )
            if removes and cfg.phase is Phase.decode:
                removes.remove_spent_blocks(source.values(f"{KV_PAYLOAD}.file").to_pylist())
            stages = _stage_metrics(graph, totals, model, cfg.engine)
            handoff = sum(s.kv_handoff_seconds for s in stages.values())
            moved = totals.get("decode", totals.get("prefill", StageTotals())).work
            prefill_busy = stages["prefill"].busy_seconds if "prefill" in stages else 0.0
            wall = time.perf_counter() - started
            startup, processing = _window(timeline, clock_zero - started_at)
            metrics = JobMetrics(
                mode=cfg.mode.value,
                phase=cfg.phase.value,
                model=cfg.model.name,
                rows_in=source.num_rows,
                rows_out=written.rows,
                rows_errored=written.rows_errored,
                errors=written.errors,
                input_tokens=written.input_tokens,
                output_tokens=written.output_tokens,
                shards=ShardCounts(total=len(source.shards), resumed=len(done)),
                wall_seconds=round(wall, 3),
                output_tokens_per_second=round(written.output_tokens / wall, 2),
                stages=stages,
                kv_bytes_moved=moved.kv_bytes,
                kv_recomputed_rows=moved.kv_recomputed,
                preemptions=sum(t.work.preempted for t in totals.values()),
                kv_bytes_per_prompt_token=moved.kv_bytes / moved.kv_tokens if moved.kv_tokens else None,
                kv_handoff_seconds=round(handoff, 3),
                kv_handoff_share_of_prefill=round(handoff / prefill_busy, 4) if prefill_busy else None,
                startup_seconds=startup,
                processing_seconds=processing,
                input_rows_decoded=counts.get("input_rows_decoded", 0),
                late_duplicate_rows=ledger.late_duplicate_rows if ledger else 0,
                driver_bytes_received=ledger.bytes_received if ledger else 0,
                kv_blocks_referenced=moved.kv_blocks_referenced,
                kv_blocks_stored=totals.get("prefill", StageTotals()).work.kv_blocks_stored,
                kv_blocks_fetched=totals.get("decode", StageTotals()).work.kv_blocks_fetched,
                kv_bytes_saved=moved.kv_bytes_saved,
                object_store_peak_bytes=peak.peak,
                nodes={node.id: node.resources for node in nodes},  # where stages.*.per_worker ran
            )
            if timeline:  # a timeline means Ray ran
                plot_url = output.fs.unstrip_protocol(f"{output.root}/{REPORT_PLOT}")
                ray.get(ray.remote(write_plot).options(num_cpus=0).remote(plot_url, timeline))
            lease.check()
            if cfg.output.format is OutputFormat.openai_batch:
                write_batch_results(cfg, output, len(source.shards), job, model, sampling)
            write_report(output, metrics, plotted=bool(timeline))  # before finish: _SUCCESS stays the last file
            output.finish(metrics.to_json())
    finally:
        for actor in (sink, registry):
            if actor:
                ray.kill(actor)
        if local:  # a test cluster of this job's own: its nodes go with it
            ray.shutdown()
            local.shutdown()
    return metrics


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
        raise JobUnfinished(f"the pipeline ended without every row of shards {ledger.missing()}; rerun to finish them")


def served_models(cfg: JobConfig) -> Served:
    """What an OpenAI Batch request's body.model may name: the model, or a LoRA adapter's name."""
    return Served(cfg.model.name, frozenset(cfg.engine.lora.adapters))


def write_batch_results(
    cfg: JobConfig, output: OutputTarget, shards: int, job: dict, model: ResolvedModel, sampling: RowSampling
) -> None:
    form = ResultFormat(
        chat=cfg.input.messages_column is not None or cfg.input.apply_chat_template,
        model=cfg.model.name,
        created=int(time.time()),
        job=_digest(job),
        tokenizer=load_tokenizer(model.path) if sampling.logprobs_column else None,
    )
    completed, failed = write_results(output, list(range(shards)), form)
    log.info("OpenAI Batch results: %d completed, %d failed", completed, failed)


def identity(cfg: JobConfig, source: PromptSource, model: ResolvedModel) -> dict:
    """What must be equal for a rerun to resume into the same output: everything that decides
    which rows exist and what is generated for them, not how the work is spread."""
    job = {
        "phase": cfg.phase.value,
        "input": source.fingerprint(),
        "prompts": {k: v for k, v in asdict(cfg.input).items() if k != "path"},
        "model": model.fingerprint,
        "model_dtype": model.dtype,
        "max_model_len": cfg.model.max_model_len,
        **({"engine_extra": cfg.engine.extra} if cfg.engine.extra else {}),  # absent when unset, as before it existed
        **({"lora": {a.name: a.digest for a in model.adapters}} if model.adapters else {}),  # likewise
        "sampling": asdict(cfg.sampling),
        "kv_codec": cfg.kv.codec.value,
        "kv_on_load_failure": cfg.kv.on_load_failure.value,
        "shard_rows": cfg.output.shard_rows,
    }
    return json.loads(json.dumps(job))  # as the manifest will read back


def _window(timeline: list[BatchPoint], clock_offset: float) -> tuple[float | None, float | None]:
    """The job's wall time split at its engine pools' first batch start and last batch end:
    start-up (Ray, the actors, loading the engines) and processing; what follows is the tail
    (the last rows through detokenize, commits, the report). `clock_offset`: the timeline's
    zero in seconds since the job started (the sink starts once Ray is up)."""
    window = processing_window(timeline, ENGINE_POOLS)
    if window is None:  # nothing ran: every shard was committed earlier
        return None, None
    start, end = window
    return round(clock_offset + start, 3), round(end - start, 3)


def payload_store(cfg: JobConfig, job: dict, output: OutputTarget) -> PayloadStore | None:
    """Where the job's payload files go (kv.storage_path): a folder of its own, named by the job
    and its output, so that two jobs alike but for their output never share one, and a rerun
    of a job finds its files."""
    if not cfg.kv.storage_path:
        return None
    return PayloadStore(cfg.kv.storage_path, _digest({**job, "output": output.location}))


def removes_files(cfg: JobConfig) -> bool:
    """Whether payload files go once their rows are committed (kv.keep_files): a job's own, by
    default; a prefill dataset's, only when a decode job is told to."""
    if cfg.phase is Phase.prefill:
        return False
    return not cfg.kv.keep_files if cfg.kv.keep_files is not None else cfg.phase is Phase.generate


def needs(cfg: JobConfig) -> tuple[str, ...]:
    """The input columns the job reads, its prompts' first."""
    if cfg.phase is Phase.decode:  # a prefill dataset
        return (PROMPT_TOKENS, GENERATED_TOKENS, NUM_INPUT_TOKENS, FINISH_REASON, KV_PAYLOAD)
    return (cfg.input.source_column, *([cfg.input.image_column] if cfg.input.image_column else []))


def reserved(cfg: JobConfig) -> tuple[str, ...]:
    """Column names the job writes, which input columns must not take: the output contract's
    (but the id column, carried as `id`), and for a prompt dataset the columns stages add (a
    prefill dataset has those already)."""
    written = (OUTPUT if cfg.phase is not Phase.decode else (GENERATED_TEXT, NUM_GENERATED_TOKENS, ERROR_KIND)) + (
        LOGPROBS,
    )
    names = written + (STAGE_COLUMNS if cfg.phase is not Phase.decode else ())
    return tuple(n for n in names if n != cfg.input.id_column)


def _digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def _stage_metrics(
    graph: list[Stage], totals: dict[str, StageTotals], model: ResolvedModel, engine: EngineConfig
) -> dict[str, StageMetrics]:
    """The pools that ran a batch, in graph order; an engine pool's with its utilisation."""
    stages = {
        stage.name: StageMetrics(
            busy_seconds=round(t.busy_seconds, 3),
            rows=t.work.rows,
            input_tokens=t.work.input_tokens,
            output_tokens=t.work.output_tokens,
            kv_handoff_seconds=round(t.work.kv_handoff_seconds, 3),
            workers=len(t.workers),
            size=stage.actors.size,
            worker_cores=t.worker_cores,
            per_worker=[replace(w, busy_seconds=round(w.busy_seconds, 3)) for w in t.workers.values()],
            engine_steps=t.work.engine_steps,
            model_flops=t.work.model_flops,
            memory_bytes=t.work.memory_bytes,
            step_seconds=t.work.step_seconds.spread(),
            inter_token_seconds=t.work.inter_token_seconds.spread(),
        )
        for stage in graph
        if (t := totals.get(stage.name)) and t.batches
    }
    for stage in stages.values():
        stage.utilisation = pool_utilisation(stage, engine, model.dtype)
    return stages
