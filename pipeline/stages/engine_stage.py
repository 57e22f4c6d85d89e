"""What the three vLLM stages (prefill, decode, colocated) share: an engine in the actor's own
process on its own cores, fed from several blocks at once, the generation budget, and metering.

The stages are async: a worker takes whole blocks (pipeline/job/graph.py block_rows sizes them), up
to `concurrent_batches` at once on the actor's asyncio loop; each call hands all its pending
rows to the one engine (pipeline/engine/loop.py), where the next block's requests join as the
last one's finish. A block with nothing left to generate (every row refused before the
engine) passes at once."""

import asyncio
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.columns import FINISH_REASON, GENERATED_TOKENS, PROMPT_TOKENS, TOKEN_LIST, pending, with_columns
from pipeline.config import Device, EngineConfig, KVConfig, PoolConfig, SamplingConfig
from pipeline.engine.build import bind_threads, build_engine
from pipeline.engine.loop import EngineLoop
from pipeline.engine.model import ResolvedModel
from pipeline.engine.placement import Placement
from pipeline.job.meter import BatchReport, StageMeter
from pipeline.kv.store import PayloadStore

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams


class EngineStage:
    stage: str
    kv_role: str | None = None

    def __init__(
        self,
        model: ResolvedModel,
        engine: EngineConfig,
        sampling: SamplingConfig,
        kv: KVConfig,
        store: PayloadStore | None,
        pool: PoolConfig,
        placement: Placement,
        sink_name: str,
    ):
        if engine.device is Device.cpu:
            bind_threads(placement.cores, placement.threads)
        self.engine = EngineLoop(lambda: build_engine(model, engine, pool, self.kv_role, kv).llm_engine)
        self.model = model
        self.sampling = sampling
        self.kv = kv
        self.store = store
        self.meter = StageMeter(self.stage, sink_name)
        # Ray Data may run more calls at once than this (a bundle of blocks is split into calls,
        # run four at a time): the rest wait here, before their requests reach the engine.
        self.slots = asyncio.Semaphore(pool.concurrent_batches)

    def budget(self, num_prompt_tokens: int) -> int:
        """Tokens a request may generate: max_tokens, or fewer where the context ends first."""
        return min(self.sampling.max_tokens, self.model.max_model_len - num_prompt_tokens)

    async def generate(self, prompts: list[list[int]], params: list["SamplingParams"]) -> list["RequestOutput"]:
        from vllm.inputs import tokens_input

        if not prompts:
            return []
        return await self.engine.generate([tokens_input(p) for p in prompts], params)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows, prompts = pending(batch), batch.column(PROMPT_TOKENS).to_pylist()
        if not rows:  # nothing for the engine, nothing to meter
            return await self.process(batch, rows, prompts, BatchReport())
        async with self.slots, self.meter.overlapping_batch() as report:
            return await self.process(batch, rows, prompts, report)

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        """Generate for `rows` (the batch's rows still pending); `prompts` holds every row's
        prompt tokens."""
        raise NotImplementedError

    @staticmethod
    def with_generation(batch: pa.Table, tokens: list, finish: list) -> pa.Table:
        return with_columns(
            batch,
            **{GENERATED_TOKENS: pa.array(tokens, TOKEN_LIST), FINISH_REASON: pa.array(finish, pa.string())},
        )
