"""What the three vLLM stages (prefill, decode, colocated) share: an engine in the actor's own
process on its own cores, fed from several blocks at once, the generation budget, and metering.

The stages are async: a worker takes whole blocks (pipeline/job/graph.py block_rows sizes them), up
to `concurrent_batches` at once on the actor's asyncio loop; each call hands all its pending
rows to the one engine (pipeline/engine/loop.py), where the next block's requests join as the
last one's finish. A block with nothing left to generate (every row refused before the
engine) passes at once."""

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.columns import (
    ENGINE_TEXT,
    ERROR,
    FINISH_REASON,
    GENERATED_TOKENS,
    IMAGES,
    LOGPROB_LIST,
    LOGPROBS,
    PROMPT_TOKENS,
    TOKEN_LIST,
    ErrorKind,
    InvalidUTF8,
    pending,
    row_error,
    with_columns,
)
from pipeline.config import Device, EngineConfig, KVConfig, PoolConfig
from pipeline.engine.build import bind_threads, build_engine, device_name
from pipeline.engine.loop import EngineLoop, RequestRefused
from pipeline.engine.lora import Adapter
from pipeline.engine.model import ResolvedModel
from pipeline.engine.placement import Placement
from pipeline.engine.sampling import RowSampling, check
from pipeline.engine.steps import StepClock, watch_tokens
from pipeline.engine.work import ModelWork
from pipeline.io.images import ImageUnreadable, RowImages, load_images
from pipeline.job.meter import BatchReport, StageMeter
from pipeline.kv.blocks import block_store
from pipeline.kv.store import PayloadStore

if TYPE_CHECKING:
    from vllm import CompletionOutput, RequestOutput, SamplingParams


@dataclass(frozen=True)
class Request:
    """A row's request as its engine takes it: its sampling, the LoRA adapter it runs under, and
    its images (prefill, colocated) or their identity alone (decode, which gets their KV)."""

    params: "SamplingParams"
    adapter: Adapter | None = None
    images: RowImages | None = None
    images_digest: str = ""

    @property
    def conditioning(self) -> str:
        """What its KV depends on besides its tokens and the model: its adapter's identity, then
        its images' (empty: neither). Its KV payload and shared blocks carry it."""
        adapter = self.adapter.digest if self.adapter else ""
        images = self.images.digest if self.images else self.images_digest
        return f"{adapter}+images:{images}" if images else adapter

    def prompt(self, tokens: list[int]) -> Any:
        """The engine's prompt. Its images go with their digests, which key vLLM's caches of
        them; without them (decode), its images' identity salts the prefix cache, whose
        block hashes would otherwise name another row's image KV behind the same ids."""
        from vllm.inputs import tokens_input

        if self.images:
            return {
                "prompt_token_ids": tokens,
                "multi_modal_data": {"image": list(self.images.images)},
                "multi_modal_uuids": {"image": list(self.images.digests)},
            }
        return tokens_input(tokens, cache_salt=self.images_digest or None)


class EngineStage:
    stage: str
    kv_role: str | None = None

    def __init__(
        self,
        model: ResolvedModel,
        engine: EngineConfig,
        sampling: RowSampling,
        kv: KVConfig,
        store: PayloadStore | None,
        pool: PoolConfig,
        placement: Placement,
        sink_name: str,
        block_registry: str | None = None,
    ):
        if engine.device is Device.cpu:
            bind_threads(placement.cores, placement.threads)
        self.steps = StepClock()
        self.adapters = {a.name: a.on_this_node() for a in model.adapters}

        def build() -> Any:
            llm_engine = build_engine(model, engine, pool, self.kv_role, kv).llm_engine
            # Loaded now: an adapter the model cannot take fails the engine's start, not a batch.
            for adapter in self.adapters.values():
                llm_engine.add_lora(adapter.request())
            watch_tokens(llm_engine, self.steps)
            return llm_engine

        self.engine = EngineLoop(build, self.steps)
        self.model = model
        self.work = ModelWork.of(model)
        self.sampling = sampling
        self.kv = kv
        self.store = store
        self.shared_blocks = block_store(store, block_registry)  # where shared prefixes' KV is
        self.meter = StageMeter(self.stage, sink_name, device_name(engine.device))
        # Ray Data may run more calls at once than this (a bundle of blocks is split into calls,
        # run four at a time): the rest wait here, before their requests reach the engine.
        self.slots = asyncio.Semaphore(pool.concurrent_batches)

    def requests(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], errors: list[str | None]
    ) -> dict[int, Request]:
        """The request of each row in `rows`: the row's sampling values over the job's, for
        max_tokens or fewer where the context ends first, under the adapter it names. A row
        whose values are bad (by kvrelay's checks or vLLM's own) gets its error instead."""
        values = self.sampling.values(batch)
        images = self.row_images(batch, rows, errors)
        requests = {}
        for i in [i for i in rows if errors[i] is None]:
            if isinstance(values[i], InvalidUTF8):
                errors[i] = values[i].error(self.sampling.column)
                continue
            problem = check(values[i])
            if problem is None and (unknown := self.unknown_lora(values[i]["lora"])):
                errors[i] = unknown
                continue
            if problem is None:
                budget = min(values[i]["max_tokens"], self.model.max_model_len - len(prompts[i]))
                try:
                    requests[i] = Request(
                        self.sampling.params(values[i], budget),
                        self.adapters.get(values[i]["lora"]),
                        **images.get(i, {}),
                    )
                except Exception as error:  # what vLLM refuses of a value: its row's error alone
                    problem = str(error)
            if problem:
                errors[i] = row_error(ErrorKind.invalid_sampling, problem)
        return requests

    def row_images(self, batch: pa.Table, rows: list[int], errors: list[str | None]) -> dict[int, dict]:
        """The images of each row in `rows` that has any, as Request fields; a row whose image
        cannot be fetched or decoded gets its error instead."""
        if IMAGES not in batch.column_names:
            return {}
        urls, found = batch.column(IMAGES).to_pylist(), {}
        for i in rows:
            if errors[i] is None and urls[i]:
                try:
                    found[i] = {"images": load_images(urls[i])}
                except ImageUnreadable as error:
                    errors[i] = str(error)
        return found

    def unknown_lora(self, name: str | None) -> str | None:
        """The row's error if it names an adapter the job does not have."""
        if name is None or name in self.adapters:
            return None
        known = ", ".join(self.adapters) or "none"
        return row_error(ErrorKind.unknown_lora, f"lora {name!r} is not one of engine.lora.adapters ({known})")

    async def generate(
        self, prompts: list[list[int]], requests: list[Request], report: BatchReport
    ) -> list["RequestOutput | RequestRefused"]:
        """The engine's outputs, their work counted in `report`."""
        if not prompts:
            return []
        outputs = await self.engine.generate(
            [r.prompt(p) for p, r in zip(prompts, requests)],
            [r.params for r in requests],
            [r.adapter.request() if r.adapter else None for r in requests],
        )
        if self.work:
            for out in outputs:
                if not isinstance(out, RequestRefused):
                    self.count_work(out, report)
        return outputs

    def count_work(self, out: "RequestOutput", report: BatchReport) -> None:
        """A request's FLOPs and cache bytes (pipeline/engine/work.py); its completions after the
        first (n > 1) share its prompt's KV."""
        prompt, cached = len(out.prompt_token_ids or ()), out.num_cached_tokens or 0
        for n, completion in enumerate(out.outputs):
            seen = cached if n == 0 else prompt
            report.model_flops += self.work.request_flops(prompt, seen, len(completion.token_ids))
            report.memory_bytes += self.work.request_bytes(prompt, seen, len(completion.token_ids))

    def with_completions(
        self,
        batch: pa.Table,
        outputs: dict[int, "RequestOutput | RequestRefused"],
        requests: dict[int, Request],
        errors: list[str | None],
        report: BatchReport,
    ) -> pa.Table:
        """The batch with each generated row's tokens, finish reason (and logprobs, when the job
        asks for them); a refused row gets its error."""
        many = self.sampling.many
        has_tokens = GENERATED_TOKENS in batch.column_names  # a prefill dataset's first tokens
        tokens = batch.column(GENERATED_TOKENS).to_pylist() if has_tokens else [None] * batch.num_rows
        finish = batch.column(FINISH_REASON).to_pylist()
        if many:  # a row's completions are a list, those made earlier too
            tokens, finish = ([None if v is None else [v] for v in column] for column in (tokens, finish))
        logprobs: list = [None] * batch.num_rows
        texts: list = [None] * batch.num_rows

        def per_row(samples: list) -> Any:
            return samples if many else samples[0]

        def typed(kind: pa.DataType) -> pa.DataType:
            return pa.list_(kind) if many else kind

        for i, out in outputs.items():
            if isinstance(out, RequestRefused):
                errors[i], tokens[i] = row_error(ErrorKind.engine_refused, out.reason), None
                continue
            samples = out.outputs if many else out.outputs[:1]
            report.output_tokens += sum(len(c.token_ids) for c in samples)
            tokens[i] = per_row([list(c.token_ids) for c in samples])
            finish[i] = per_row([c.finish_reason for c in samples])
            logprobs[i] = per_row([token_logprobs(c, requests[i].params.logprobs) for c in samples])
            if requests[i].params.stop:  # the text ends before the stop string; the tokens hold all of it
                texts[i] = per_row([c.text for c in samples])
        columns = {
            GENERATED_TOKENS: pa.array(tokens, typed(TOKEN_LIST)),
            FINISH_REASON: pa.array(finish, typed(pa.string())),
            ERROR: pa.array(errors, pa.string()),
            ENGINE_TEXT: pa.array(texts, typed(pa.string())),
        }
        if self.sampling.logprobs_column:
            columns[LOGPROBS] = pa.array(logprobs, typed(LOGPROB_LIST))
        return with_columns(batch, **columns)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows, prompts = pending(batch), batch.column(PROMPT_TOKENS).to_pylist()
        if not rows:  # nothing for the engine, nothing to meter
            return await self.process(batch, rows, prompts, BatchReport())
        async with self.slots, self.meter.overlapping_batch() as report:
            done = await self.process(batch, rows, prompts, report)
            steps = self.steps.take()  # the engine's steps since the last batch ended
            report.engine_steps = steps.steps
            report.step_seconds, report.inter_token_seconds = steps.step_seconds, steps.inter_token_seconds
            if self.work:  # each step reads every weight once
                report.memory_bytes += steps.steps * self.work.weight_bytes
            return done

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        """Generate for `rows` (the batch's rows still pending); `prompts` holds every row's
        prompt tokens."""
        raise NotImplementedError


def token_logprobs(completion: "CompletionOutput", top: int | None) -> list[dict] | None:
    """Per generated token: its logprob and the `top` most likely tokens' (vLLM also returns
    the sampled token's where it is not among them)."""
    if top is None or completion.logprobs is None:
        return None
    out = []
    for token, alternatives in zip(completion.token_ids, completion.logprobs):
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in alternatives.items() if lp.rank <= top)
        out.append(
            {
                "token_id": token,
                "logprob": alternatives[token].logprob,
                "top": [{"token_id": t, "logprob": logprob} for _, t, logprob in ranked],
            }
        )
    return out
