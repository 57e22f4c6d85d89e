"""Prefill stage: computes each prompt's KV and first token, and emits the KV as a payload
column for the decode pool (inline, or as a file name with kv.transport=storage)."""

import uuid

import pyarrow as pa

from pipeline.columns import FINISH_REASON, KV_PAYLOAD, with_columns
from pipeline.config import Transport
from pipeline.engine.build import PRODUCER, sampling_params
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
        keys = [uuid.uuid4().hex for _ in rows]
        outputs = await self.generate(
            [prompts[i] for i in rows], [sampling_params(self.sampling, 1, key) for key in keys]
        )
        tokens: list = [None] * batch.num_rows
        finish = batch.column(FINISH_REASON).to_pylist()
        payloads: list[KVPayload | None] = [None] * batch.num_rows
        for i, key, out in zip(rows, keys, outputs):
            saved = handoff.take_saved(key)
            completion = out.outputs[0]
            tokens[i] = list(completion.token_ids)
            with handoff.timed():
                data = saved.result()  # encoded by the connector, in host memory once copied
            if completion.finish_reason == "stop" or self.budget(len(prompts[i])) == 1:
                finish[i] = completion.finish_reason
                continue
            with handoff.timed():
                encoded = KVPayload.of(data, saved.shape, self.model, self.kv.codec.value)
                payloads[i] = self.store.put(encoded) if self.kv.transport is Transport.storage else encoded
            report.kv_bytes += encoded.data.nbytes
            report.kv_tokens += encoded.num_tokens
        with handoff.timed():
            column = payload.to_column(payloads)
        report.rows = len(rows)
        report.input_tokens = sum(len(prompts[i]) for i in rows)
        report.output_tokens = len(rows)
        report.kv_handoff_seconds = handoff.seconds.take()
        report.preempted = int(handoff.preemptions.take())
        return with_columns(self.with_generation(batch, tokens, finish), **{KV_PAYLOAD: column})
