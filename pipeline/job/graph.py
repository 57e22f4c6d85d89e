"""The Ray Data graph of a job, by mode and phase:

read shards -> tokenize -> prefill pool -> (KV payload column) -> decode pool -> detokenize -> write
read shards -> tokenize -> colocated pool ---------------------------------> detokenize -> write
phase=prefill: read shards -> tokenize -> prefill pool -> write (a prefill dataset)
phase=decode:  read shards (a prefill dataset) -> decode pool -> detokenize -> write

Each stage is a config (its pool) and the callable its actors run; the write step puts the rows
in fragment files where they are, so the dataset that reaches the driver holds only the
fragments' names and row numbers (pipeline/io/commit.py turns them into committed shards).
"""

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy, ExecutionResources

from pipeline.columns import PROMPT_TOKENS
from pipeline.config import ClusterConfig, JobConfig, Mode, Phase, PoolConfig, Transport
from pipeline.engine.model import ResolvedModel
from pipeline.engine.placement import place_engines
from pipeline.engine.sampling import RowSampling
from pipeline.io.output import OutputTarget
from pipeline.io.source import UNIT, PromptSource, Shard
from pipeline.kv.store import PayloadStore
from pipeline.stages.colocated import Colocated
from pipeline.stages.decode import Decode
from pipeline.stages.detokenize import Detokenize
from pipeline.stages.engine_stage import EngineStage
from pipeline.stages.prefill import Prefill
from pipeline.stages.tokenize import Tokenize
from pipeline.stages.write import WriteFragments

BLOCKS_PER_ENGINE_WORKER = 4
BLOCK_BYTES = 32 << 20
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


def build_stages(
    cfg: JobConfig,
    model: ResolvedModel,
    carried: list[str],
    sink: str,
    store: PayloadStore | None,
    sampling: RowSampling | None = None,
    block_registry: str | None = None,
) -> list[Stage]:
    """The job's stages; `sampling` says which per-row sampling keys its input has (none by
    default); `block_registry` names the actor that holds shared blocks in the object store."""
    pools, placements = cfg.pools, place_engines(cfg)
    kv = cfg.kv if shares_blocks(cfg) else replace(cfg.kv, shared_block_tokens=0)

    def engine(name: str, fn: type) -> Stage:
        constructor = dict(
            model=model,
            engine=cfg.engine,
            sampling=sampling or RowSampling(cfg.sampling, cfg.input.sampling_column),
            kv=kv,
            store=store,
            pool=getattr(pools, name),
            placement=placements[name],
            sink_name=sink,
            block_registry=block_registry,
        )
        return Stage(name, fn, getattr(pools, name), constructor, placements[name].env())

    tokenize = Stage(
        "tokenize",
        Tokenize,
        pools.tokenize,
        dict(model=model, input=cfg.input, max_tokens=cfg.sampling.max_tokens, sink_name=sink),
    )
    detokenize = Stage(
        "detokenize",
        Detokenize,
        pools.detokenize,
        dict(model=model, id_column=cfg.input.id_column, carried=carried, sink_name=sink),
    )
    if cfg.mode is Mode.colocated:
        return [tokenize, engine("colocated", Colocated), detokenize]
    if cfg.phase is Phase.prefill:
        return [tokenize, engine("prefill", Prefill)]
    if cfg.phase is Phase.decode:
        return [engine("decode", Decode), detokenize]
    return [tokenize, engine("prefill", Prefill), engine("decode", Decode), detokenize]


def shares_blocks(cfg: JobConfig) -> bool:
    """Whether rows name the prefix blocks they share (kv.shared_block_tokens): not colocated,
    and not in a prefill dataset whose KV is inline, which must hold all of it."""
    inline_dataset = cfg.phase is Phase.prefill and cfg.kv.transport is Transport.object_store
    return cfg.mode is Mode.disaggregated and cfg.kv.shared_block_tokens > 0 and not inline_dataset


def needs_block_registry(cfg: JobConfig) -> bool:
    """Shared blocks in the object store: held by an actor of the job's own."""
    return shares_blocks(cfg) and cfg.phase is Phase.generate and cfg.kv.transport is Transport.object_store


def build_dataset(
    source: PromptSource,
    shards: list[Shard],
    stages: list[Stage],
    output: OutputTarget,
    cluster: ClusterConfig,
    sink_name: str,
    kv_row_bytes: float,
    order_by: str | None = None,
) -> ray.data.Dataset:
    """The rows of `shards` through `stages`, written as fragments by the workers: the dataset's
    own rows are the fragments' names and row numbers. Each shard's rows go in the order of the
    prompts of column `order_by`, if given."""
    # The process's context: set for every job, so that no job inherits an earlier one's limits.
    context = ray.data.DataContext.get_current()
    budget = cluster.object_store_budget_gib
    context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=budget * 2**30 if budget is not None else None
    )
    context.output_backpressure_guard_release_interval_s = cluster.backpressure_release_s
    reader = source.reader(shards, sink_name, order_by)
    ds = ray.data.from_items([{UNIT: i} for i in reader.units], override_num_blocks=len(reader.units))
    ds = ds.map_batches(reader, batch_size=1, batch_format="pyarrow", num_cpus=cluster.io_num_cpus)
    # The cut is an op of its own that reserves a whole CPU while it runs (Ray Data offers no
    # way to lower it).
    rows = block_rows(sum(s.num_rows for s in shards), stages, source.bytes_per_row(), kv_row_bytes)
    ds = ds.repartition(target_num_rows_per_block=rows)
    for stage in stages:  # an engine worker takes each block whole
        ds = stage.apply(ds, rows if stage.runs_engine else stage.actors.batch_size)
    starts = np.array([s.first_row for s in shards], np.int64)
    folder = output.fs.unstrip_protocol(output.fragments())  # a URL: the workers open it on the output's store
    # Writers are actors, as many as the last stage's workers, reserving no CPU (as the commit
    # tasks): a task op at the end of the graph gets no share of Ray Data's resource budget until
    # every other op is done, and with the cut above holding a whole CPU, a writer that reserved
    # any would stall the pipeline on a small machine.
    return ds.map_batches(
        WriteFragments,
        fn_constructor_kwargs=dict(folder=folder, starts=starts, shards=np.array([s.index for s in shards], np.int64)),
        batch_size=None,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=stages[-1].actors.size),
        num_cpus=0,
    )


def block_rows(rows: int, stages: list[Stage], row_bytes: float, kv_row_bytes: float) -> int:
    """Rows per block, as the read is cut, and per call of an engine worker. Ray Data's cost is
    per block (in the workers and in the driver's scheduling loop), so blocks are as large as
    three bounds allow: about BLOCK_BYTES of rows (`row_bytes` each, as read); few enough that
    each engine worker gets several blocks and the last ones spread over them; and where KV
    leaves a stage (`kv_row_bytes` a row), a block's KV within Ray Data's block size
    (DataContext.target_max_block_size). A block may hold several shards: the writers cut it
    by shard. Never fewer than an engine pool's batch_size: the rows that keep its engine full."""
    engines = [s.actors for s in stages if s.runs_engine]
    spread = -(-rows // (BLOCKS_PER_ENGINE_WORKER * sum(pool.size for pool in engines)))
    by_size = int(BLOCK_BYTES // max(row_bytes, 1))
    fits = int(ray.data.DataContext.get_current().target_max_block_size // kv_row_bytes) if kv_row_bytes else rows
    return max(min(by_size, spread, fits), max(pool.batch_size for pool in engines))


def kv_row_bytes(cfg: JobConfig, source: PromptSource, model: ResolvedModel) -> float:
    """The KV a row's prompt makes, estimated before the job runs from the first rows' prompts
    (about 4 bytes of text or token ids a token; a row without a prompt makes none); none
    colocated."""
    if cfg.mode is Mode.colocated:
        return 0
    prompts = PROMPT_TOKENS if cfg.phase is Phase.decode else cfg.input.source_column
    prompt_bytes, share = source.prompt_bytes(prompts)
    return model.cache.request_bytes(int(prompt_bytes / BYTES_PER_TOKEN) + 1) * share
