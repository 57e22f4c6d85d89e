"""Prefill stage: computes each prompt's KV (and, greedily, a first token, which a prefill
dataset keeps), and emits the KV as a payload column for the decode pool (inline, or as a file
name with kv.transport=storage). Every token of the completion is the decode engine's, sampled
there as the row asks, so a seeded row draws the same tokens as in one engine."""

import uuid

import pyarrow as pa

from pipeline.columns import ERROR, GENERATED_TOKENS, KV_PAYLOAD, TOKEN_LIST, ErrorKind, row_error, with_columns
from pipeline.config import Transport
from pipeline.engine.build import PRODUCER
from pipeline.engine.loop import RequestRefused
from pipeline.job.meter import BatchReport
from pipeline.kv import handoff, payload
from pipeline.kv.payload import KVPayload
from pipeline.stages.engine_stage import EngineStage


class Prefill(EngineStage):
    stage = "prefill"
    kv_role = PRODUCER

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        # A row's sampling is the decode engine's to apply, from the first token on; a bad value
        # is refused here, before the row's KV is computed.
        keys = {i: uuid.uuid4().hex for i in self.requests(batch, rows, prompts, errors)}
        outputs = await self.generate([prompts[i] for i in keys], [self.sampling.prefill(key) for key in keys.values()])
        tokens: list = [None] * batch.num_rows
        payloads: list[KVPayload | None] = [None] * batch.num_rows
        for (i, key), out in zip(keys.items(), outputs):
            if isinstance(out, RequestRefused):
                errors[i] = row_error(ErrorKind.engine_refused, out.reason)
                continue
            saved = handoff.take_saved(key)
            tokens[i] = list(out.outputs[0].token_ids)
            with handoff.timed():
                encoded = KVPayload.of(saved.result(), saved.shape, self.model, self.kv.codec.value)
                payloads[i] = self.store.put(encoded) if self.kv.transport is Transport.storage else encoded
            report.kv_bytes += encoded.data.nbytes
            report.kv_tokens += encoded.num_tokens
        with handoff.timed():
            column = payload.to_column(payloads)
        report.rows = len(rows)
        report.input_tokens = sum(len(prompts[i]) for i in rows)
        report.output_tokens = len(keys)
        report.kv_handoff_seconds = handoff.seconds.take()
        report.preempted = int(handoff.preemptions.take())
        return with_columns(
            batch,
            **{
                GENERATED_TOKENS: pa.array(tokens, TOKEN_LIST),
                ERROR: pa.array(errors, pa.string()),
                KV_PAYLOAD: column,
            },
        )
