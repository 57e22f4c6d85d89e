"""Assembles the Ray Data graph for a mode and runs it:

read shards -> tokenize -> prefill pool -> (KV payload column) -> decode pool -> detokenize -> commit shards
read shards -> tokenize -> colocated pool ---------------------------------> detokenize -> commit shards

Shards already committed by an earlier run of the same job are not read again.
"""
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import ray
import ray.data
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from pipeline.config import ClusterConfig, JobConfig, Mode, PoolConfig
from pipeline.errors import JobError
from pipeline.metrics import start_sink
from pipeline.model import ResolvedModel, resolve_model
from pipeline.output import OutputTarget, ShardCommitter
from pipeline.placement import place_engines
from pipeline.source import SHARD, PromptSource, Shard
from pipeline.stages.colocated import Colocated
from pipeline.stages.decode import Decode
from pipeline.stages.detokenize import Detokenize
from pipeline.stages.prefill import Prefill
from pipeline.stages.tokenize import Tokenize

log = logging.getLogger(__name__)


def start_ray(cluster: ClusterConfig) -> None:
    if ray.is_initialized():
        return
    if cluster.address:
        ray.init(address=cluster.address)
    else:
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=False)


@dataclass(frozen=True)
class Stage:
    """One step of the graph: `fn` constructed with `constructor` in each actor of a
    fixed-size pool, fed pyarrow batches."""

    name: str
    fn: type
    actors: PoolConfig
    constructor: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(
            self.fn,
            batch_size=self.actors.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=self.actors.size),
            num_cpus=self.actors.num_cpus,
            num_gpus=self.actors.num_gpus,
            fn_constructor_kwargs=self.constructor,
            runtime_env={"env_vars": self.env} if self.env else None,
            ray_remote_args_fn=partial(dict, max_restarts=self.actors.max_restarts),
        )


def plan(cfg: JobConfig, model: ResolvedModel, carried: list[str], sink: str) -> list[Stage]:
    pools, placements = cfg.pools, place_engines(cfg)
    engines = [("colocated", Colocated)] if cfg.mode is Mode.colocated else [("prefill", Prefill), ("decode", Decode)]
    return [
        Stage("tokenize", Tokenize, pools.tokenize,
              dict(model=model, input=cfg.input, max_tokens=cfg.sampling.max_tokens, sink_name=sink)),
        *(
            Stage(name, fn, getattr(pools, name), dict(model=model, engine=cfg.engine, sampling=cfg.sampling, kv=cfg.kv,
                                                       pool=getattr(pools, name), placement=placements[name], sink_name=sink),
                  placements[name].env())
            for name, fn in engines
        ),
        Stage("detokenize", Detokenize, pools.detokenize,
              dict(model=model, id_column=cfg.input.id_column, carried=carried, sink_name=sink)),
    ]  # fmt: skip


def build(source: PromptSource, shards: list[Shard], stages: list[Stage], io_num_cpus: float) -> ray.data.Dataset:
    check_capacity(stages, io_num_cpus)
    ds = ray.data.from_items([{SHARD: s.index} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(source.reader(shards), batch_size=1, batch_format="pyarrow", num_cpus=io_num_cpus)
    for stage in stages:
        ds = stage.apply(ds)
    return ds


def check_capacity(stages: list[Stage], io_num_cpus: float) -> None:
    """Fail now rather than hang: the pools hold their CPUs for the whole run, and reading
    needs some beside them."""
    reserved = sum(s.actors.size * s.actors.num_cpus for s in stages)
    total = ray.cluster_resources().get("CPU", 0)
    if reserved + io_num_cpus > total:
        pools = ", ".join(f"{s.name} {s.actors.size}x{s.actors.num_cpus:g}" for s in stages)
        raise JobError(
            f"the stage pools reserve {reserved:g} of the cluster's {total:g} CPUs ({pools}); reading needs "
            f"{io_num_cpus:g} more: lower pools.<stage>.num_cpus or pools.<stage>.size, or add CPUs"
        )


def commit(ds: ray.data.Dataset, output: OutputTarget, shards: list[Shard]) -> None:
    """Streams the finished rows to the driver and commits each shard as it completes."""
    committer = ShardCommitter(output, shards)
    with tqdm(total=sum(s.num_rows for s in shards), unit="row", desc="committed", dynamic_ncols=True) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            progress.update(committer.add(batch))
    committer.check_complete()


def identity(cfg: JobConfig, source: PromptSource, model: ResolvedModel) -> dict:
    """What must be equal for a rerun to resume into the same output: everything that decides
    which rows exist and what is generated for them, not how the work is spread."""
    job = {
        "input": source.fingerprint(),
        "prompts": {k: v for k, v in asdict(cfg.input).items() if k != "path"},
        "model": model.fingerprint,
        "sampling": asdict(cfg.sampling),
        "shard_rows": cfg.output.shard_rows,
    }
    return json.loads(json.dumps(job))  # as the manifest will read back


def run(cfg: JobConfig) -> dict:
    """Runs one job to completion (or finishes a crashed run of it); returns the metrics also
    written to metrics.json."""
    started = time.perf_counter()
    source = PromptSource(cfg.input, cfg.output.shard_rows)
    model = resolve_model(cfg.model)
    output = OutputTarget(cfg.output, identity(cfg, source, model))
    done = output.prepare()
    todo = [s for s in source.shards if s.index not in done]
    stage_metrics = {}
    if todo:
        start_ray(cfg.cluster)
        sink_name, sink = start_sink()
        try:
            graph = plan(cfg, model, source.schema.names, sink_name)
            commit(build(source, todo, graph, cfg.cluster.io_num_cpus), output, todo)
            stage_metrics = ray.get(sink.stages.remote())
        finally:
            ray.kill(sink)
    shards = {"total": len(source.shards), "resumed": len(done)}
    metrics = summarize(cfg, source.num_rows, output.count(), stage_metrics, shards, time.perf_counter() - started)
    output.finish(metrics)
    return metrics


def summarize(cfg: JobConfig, rows_in: int, written: dict, stages: dict, shards: dict, wall: float) -> dict:
    moved = stages.get("decode", {})
    kv_bytes, kv_tokens = moved.get("kv_bytes", 0), moved.get("kv_tokens", 0)
    return {
        "mode": cfg.mode.value,
        "model": cfg.model.name,
        "rows_in": rows_in,
        **written,
        "shards": shards,
        "wall_seconds": round(wall, 3),
        "output_tokens_per_second": round(written["output_tokens"] / wall, 2),
        "stages": {
            name: {"busy_seconds": s["busy_seconds"], "rows": s["rows"], "workers": len(s["worker_cores"]),
                   "worker_cores": s["worker_cores"]}
            for name, s in stages.items()
        },  # fmt: skip
        "kv_bytes_moved": kv_bytes,
        "kv_recomputed_rows": moved.get("kv_recomputed", 0),
        "kv_bytes_per_prompt_token": kv_bytes / kv_tokens if kv_tokens else None,
    }
