"""Colocated stage: one engine runs prefill and decode for each request (the baseline)."""

import pyarrow as pa

from pipeline.columns import ERROR, IMAGES, NUM_INPUT_TOKENS, with_columns
from pipeline.engine.loop import RequestRefused
from pipeline.job.meter import BatchReport
from pipeline.stages.engine_stage import EngineStage


class Colocated(EngineStage):
    stage = "colocated"

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        requests = self.requests(batch, rows, prompts, errors)
        outputs = await self.generate([prompts[i] for i in requests], list(requests.values()), report)
        report.rows = len(rows)
        report.input_tokens = sum(len(prompts[i]) for i in rows)
        batch = self.with_completions(batch, dict(zip(requests, outputs)), requests, errors, report)
        if IMAGES not in batch.column_names:
            return batch
        # A row with images counts its prompt as the engine expanded it, as the split does.
        num_input = batch.column(NUM_INPUT_TOKENS).to_pylist()
        for i, out in zip(requests, outputs):
            if requests[i].images and not isinstance(out, RequestRefused):
                num_input[i] = len(out.prompt_token_ids)
        return with_columns(batch, **{NUM_INPUT_TOKENS: pa.array(num_input, pa.int32())})
