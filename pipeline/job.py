"""Assembles the Ray Data graph for a mode and runs it:

read_parquet -> tokenize -> prefill pool -> (KV payload column) -> decode pool -> detokenize -> write_parquet
read_parquet -> tokenize -> colocated pool ---------------------------------> detokenize -> write_parquet
"""
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data
from ray.data import ActorPoolStrategy

from pipeline.config import ClusterConfig, JobConfig, Mode, PoolConfig
from pipeline.errors import JobError
from pipeline.io import OutputTarget, PromptSource
from pipeline.metrics import start_sink
from pipeline.model import ResolvedModel, resolve_model
from pipeline.placement import place_engines
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
        )


def plan(cfg: JobConfig, model: ResolvedModel, carried: list[str], sink: str) -> list[Stage]:
    pools, placements = cfg.pools, place_engines(cfg)
    engines = [("colocated", Colocated)] if cfg.mode is Mode.colocated else [("prefill", Prefill), ("decode", Decode)]
    return [
        Stage("tokenize", Tokenize, pools.tokenize, dict(model=model, input=cfg.input, sink_name=sink)),
        *(
            Stage(name, fn, getattr(pools, name), dict(model=model, engine=cfg.engine, sampling=cfg.sampling,
                                                       pool=getattr(pools, name), placement=placements[name], sink_name=sink),
                  placements[name].env())
            for name, fn in engines
        ),
        Stage("detokenize", Detokenize, pools.detokenize,
              dict(model=model, id_column=cfg.input.id_column, carried=carried, sink_name=sink)),
    ]  # fmt: skip


def build(ds: ray.data.Dataset, stages: list[Stage]) -> ray.data.Dataset:
    check_capacity(stages)
    for stage in stages:
        ds = stage.apply(ds)
    return ds


def check_capacity(stages: list[Stage]) -> None:
    """Fail now rather than hang: the pools hold their CPUs for the whole run, and Ray Data's
    file-listing task waits for one whole free CPU."""
    reserved = sum(s.actors.size * s.actors.num_cpus for s in stages)
    total = ray.cluster_resources().get("CPU", 0)
    if reserved + 1 > total:
        pools = ", ".join(f"{s.name} {s.actors.size}x{s.actors.num_cpus:g}" for s in stages)
        raise JobError(
            f"the stage pools reserve {reserved:g} of the cluster's {total:g} CPUs ({pools}); Ray Data needs "
            "1 more for reading: lower pools.<stage>.num_cpus or pools.<stage>.size, or add CPUs"
        )


def run(cfg: JobConfig) -> dict:
    """Runs one job to completion; returns the metrics also written to metrics.json."""
    started = time.perf_counter()
    source = PromptSource(cfg.input)
    output = OutputTarget(cfg.output)
    output.prepare()
    model = resolve_model(cfg.model)
    start_ray(cfg.cluster)
    ds, carried = source.read(cfg.cluster.io_num_cpus)
    rows_in = ds.count()
    if rows_in == 0:
        raise JobError(f"input.path {cfg.input.path} has no rows")
    sink_name, sink = start_sink()
    try:
        output.write(build(ds, plan(cfg, model, carried, sink_name)), cfg.cluster.io_num_cpus)
        stages = ray.get(sink.stages.remote())
    finally:
        ray.kill(sink)
    metrics = summarize(cfg, rows_in, output.count(), stages, time.perf_counter() - started)
    output.finish(metrics)
    return metrics


def summarize(cfg: JobConfig, rows_in: int, written: dict, stages: dict, wall: float) -> dict:
    moved = stages.get("decode", {})
    kv_bytes, kv_tokens = moved.get("kv_bytes", 0), moved.get("kv_tokens", 0)
    return {
        "mode": cfg.mode.value,
        "model": cfg.model.name,
        "rows_in": rows_in,
        **written,
        "wall_seconds": round(wall, 3),
        "output_tokens_per_second": round(written["output_tokens"] / wall, 2),
        "stages": {
            name: {"busy_seconds": s["busy_seconds"], "rows": s["rows"], "workers": len(s["worker_cores"]),
                   "worker_cores": s["worker_cores"]}
            for name, s in stages.items()
        },  # fmt: skip
        "kv_bytes_moved": kv_bytes,
        "kv_bytes_per_prompt_token": kv_bytes / kv_tokens if kv_tokens else None,
    }
