"""Decode stage: loads each prompt's KV payload into its own engine and continues generating
after the first token."""
import uuid

import pyarrow as pa

from pipeline.columns import ERROR, FINISH_REASON, GENERATED_TOKENS, with_columns
from pipeline.metrics import BatchReport
from pipeline.engine import CONSUMER, sampling_params
from pipeline.kv import handoff, payload
from pipeline.kv.payload import PayloadMismatch
from pipeline.stages.engine_stage import EngineStage


class Decode(EngineStage):
    stage = "decode"
    kv_role = CONSUMER

    def process(self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport) -> pa.Table:
        tokens = batch.column(GENERATED_TOKENS).to_pylist()
        finish = batch.column(FINISH_REASON).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        payloads = payload.from_columns(batch)
        ready = []
        for i in rows:
            try:
                if payloads[i] is None:
                    raise PayloadMismatch("KV payload is missing")
                payloads[i].check(self.model, len(prompts[i]))
                ready.append(i)
            except PayloadMismatch as error:
                errors[i] = str(error)
        keys = [uuid.uuid4().hex for _ in ready]
        for i, key in zip(ready, keys):
            handoff.offer(key, payloads[i].kv)
        try:
            # The prompt plus the first token: the engine loads the prompt's KV and
            # computes only the first token's.
            outputs = self.generate(
                [prompts[i] + tokens[i] for i in ready],
                [sampling_params(self.sampling, self.budget(len(prompts[i])) - 1, key) for i, key in zip(ready, keys)],
            )
        finally:
            for key in keys:
                handoff.withdraw(key)
        for i, out in zip(ready, outputs):
            tokens[i] = tokens[i] + list(out.outputs[0].token_ids)
            finish[i] = out.outputs[0].finish_reason
        report.rows = len(ready)
        report.output_tokens = sum(len(tokens[i]) - 1 for i in ready)
        report.kv_bytes = sum(payloads[i].kv.nbytes for i in ready)
        report.kv_tokens = sum(payloads[i].num_tokens for i in ready)
        batch = self.with_generation(batch, tokens, finish)
        return with_columns(batch, **{ERROR: pa.array(errors, pa.string())}).drop_columns(list(payload.COLUMNS))
