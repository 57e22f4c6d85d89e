"""kvrelay from Python: a whole job, or the stages composed into a Ray Data pipeline of your own.

    import ray
    from pipeline.api import compose, process, run_job

    # A job, as `python -m jobs.generate` runs it: resumable output, _metrics.json, the report.
    metrics = run_job(compose("mode=disaggregated", "input.path=s3://b/prompts/", "output.path=s3://b/out/"))

    # The stages on a Dataset of yours: a lazy Dataset of completions to transform or write.
    prompts = ray.data.read_parquet("s3://b/prompts/").filter(lambda row: row["lang"] == "en")
    completions = process(prompts, compose("mode=disaggregated", "sampling.max_tokens=128"))
    completions.write_parquet("s3://b/english/")

`process` takes the same config as a job (the input and output paths aside) and gives rows of
the output contract with the input's columns carried; a bad row is its error, as in a job. What
only a job does: exactly-once output and resume, input checks that read the whole input (null
and duplicate ids), metrics and the report, and kv.transport=storage (its files go as rows
commit). Rows are numbered in the order they reach kvrelay, so rows seeded from `sampling.seed`
draw the same samples on a rerun when the Dataset keeps its order
(`DataContext.execution_options.preserve_order`). No number is given twice, even when Ray
restarts the numbering worker (a batch it redoes gets new numbers).
"""

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from ray.data import ActorPoolStrategy

from pipeline.cluster import on_driver_node, start_ray
from pipeline.columns import ERROR, INTERNAL, ROW
from pipeline.config import JobConfig, Phase, Transport, register
from pipeline.engine.model import resolve_model
from pipeline.engine.sampling import RowSampling
from pipeline.errors import JobError
from pipeline.io.source import check_columns
from pipeline.job.graph import build_stages
from pipeline.job.meter import start_sink
from pipeline.job.metrics import JobMetrics
from pipeline.job.run import needs, reserved, run
from pipeline.job.validate import check_handoff, check_job

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(*overrides: str) -> JobConfig:
    """The job config that `conf/config.yaml` and Hydra overrides make, as on the command line."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides))
    for section in (cfg.input, cfg.output):  # not needed by process(); run_job refuses them unset
        if OmegaConf.is_missing(section, "path"):
            section.path = ""
    return OmegaConf.to_object(cfg)


def run_job(cfg: JobConfig) -> JobMetrics:
    """Runs a job to its end (or resumes it), as the command line does; its metrics, also in
    the output's _metrics.json. Raises JobError for what it refuses before any work."""
    return run(cfg)


def process(ds: ray.data.Dataset, cfg: JobConfig) -> ray.data.Dataset:
    """The completions of a Dataset of prompts (cfg.input names its columns), lazily: the
    stages of cfg.mode, each a pool of actors, appended to `ds`."""
    if cfg.phase is not Phase.generate:
        raise JobError("process() generates: run prefill and decode jobs with run_job")
    if cfg.kv.transport is Transport.storage:
        raise JobError("process() hands KV through the object store; kv.transport=storage needs run_job")
    check_job(cfg, paths=False)
    schema = pa.schema(zip(ds.schema().names, ds.schema().types))
    check_columns(schema, needs(cfg), reserved(cfg))
    model = resolve_model(cfg.model, cfg.engine)
    check_handoff(cfg, model)
    sampling = RowSampling.of(cfg.sampling, cfg.input.sampling_column, schema)
    if not ray.is_initialized():
        start_ray(cfg.cluster)
    sink_name, sink = start_sink()
    stages = build_stages(cfg, model, schema.names, sink_name, None, sampling)
    ds = numbered(ds, None if cfg.input.id_column in schema.names else cfg.input.id_column)
    for stage in stages:
        ds = stage.apply(ds, stage.actors.batch_size)
    # The stages report to the sink, which lives as long as a handle to it: the Dataset's own.
    return ds.map_batches(_without_internal, fn_kwargs=dict(sink=sink), batch_format="pyarrow", batch_size=None)


def numbered(ds: ray.data.Dataset, id_column: str | None) -> ray.data.Dataset:
    """`ds` with its rows numbered in the order they come (and ids where the input has none,
    in `id_column`). The count lives in an actor of its own on the driver's node, which the
    Dataset holds: a numbering worker that Ray restarts goes on from it."""
    name = f"kvrelay-rows-{uuid.uuid4().hex[:8]}"
    counter = ray.remote(num_cpus=0)(RowCounter).options(name=name, **on_driver_node()).remote()
    return ds.map_batches(
        Numbered,
        fn_constructor_kwargs=dict(counter=counter, id_column=id_column),
        batch_format="pyarrow",
        batch_size=None,
        compute=ActorPoolStrategy(size=1),  # one worker: numbers in the order batches come
        num_cpus=0,
    )


class RowCounter:
    def __init__(self) -> None:
        self.next = 0

    def take(self, rows: int) -> int:
        """The first of `rows` numbers no one has had (the next number, for none)."""
        self.next += rows
        return self.next - rows


class Numbered:
    """Numbers rows, gives them the empty error column the stages fill, and ids where the input
    has none (their numbers)."""

    def __init__(self, counter: ray.actor.ActorHandle, id_column: str | None):
        self.counter = counter
        self.id_column = id_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        first = ray.get(self.counter.take.remote(batch.num_rows))
        rows = pa.array(np.arange(first, first + batch.num_rows, dtype=np.int64))
        batch = batch.append_column(ROW, rows).append_column(ERROR, pa.nulls(batch.num_rows, pa.string()))
        return batch.append_column(self.id_column, rows) if self.id_column else batch


def _without_internal(batch: pa.Table, sink: ray.actor.ActorHandle) -> pa.Table:
    return batch.drop_columns([c for c in batch.column_names if c.startswith(INTERNAL)])
