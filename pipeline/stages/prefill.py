"""Prefill stage: computes each prompt's KV and first token, and emits the KV as a payload
column for the decode pool."""
import uuid

import pyarrow as pa

from pipeline.columns import FINISH_REASON, with_columns
from pipeline.engine import PRODUCER, sampling_params
from pipeline.kv import handoff, payload
from pipeline.kv.payload import KVPayload
from pipeline.metrics import BatchReport
from pipeline.stages.engine_stage import EngineStage


class Prefill(EngineStage):
    stage = "prefill"
    kv_role = PRODUCER

    def process(self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport) -> pa.Table:
        keys = [uuid.uuid4().hex for _ in rows]
        outputs = self.generate([prompts[i] for i in rows], [sampling_params(self.sampling, 1, key) for key in keys])
        tokens: list = [None] * batch.num_rows
        finish = batch.column(FINISH_REASON).to_pylist()
        payloads: list[KVPayload | None] = [None] * batch.num_rows
        for i, key, out in zip(rows, keys, outputs):
            kv = handoff.take_saved(key)
            completion = out.outputs[0]
            tokens[i] = list(completion.token_ids)
            if completion.finish_reason == "stop" or self.budget(len(prompts[i])) == 1:
                finish[i] = completion.finish_reason
            else:
                payloads[i] = KVPayload.encode(kv, self.model, self.kv.codec.value)
        report.rows = len(rows)
        report.input_tokens = sum(len(prompts[i]) for i in rows)
        report.output_tokens = len(rows)
        report.kv_bytes = sum(p.data.nbytes for p in payloads if p)
        report.kv_tokens = sum(p.num_tokens for p in payloads if p)
        return with_columns(self.with_generation(batch, tokens, finish), **{payload.KV: payload.to_column(payloads)})
