"""Colocated stage: one engine runs prefill and decode for each request (the baseline)."""

import pyarrow as pa

from pipeline.columns import FINISH_REASON
from pipeline.engine.build import sampling_params
from pipeline.job.meter import BatchReport
from pipeline.stages.engine_stage import EngineStage


class Colocated(EngineStage):
    stage = "colocated"

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        outputs = await self.generate(
            [prompts[i] for i in rows], [sampling_params(self.sampling, self.budget(len(prompts[i]))) for i in rows]
        )
        tokens: list = [None] * batch.num_rows
        finish = batch.column(FINISH_REASON).to_pylist()
        for i, out in zip(rows, outputs):
            tokens[i] = list(out.outputs[0].token_ids)
            finish[i] = out.outputs[0].finish_reason
        report.rows = len(rows)
        report.input_tokens = sum(len(prompts[i]) for i in rows)
        report.output_tokens = sum(len(tokens[i]) for i in rows)
        return self.with_generation(batch, tokens, finish)
