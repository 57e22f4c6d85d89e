"""Colocated stage: one engine runs prefill and decode for each request (the baseline)."""

import pyarrow as pa

from pipeline.columns import ERROR
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
        return self.with_completions(batch, dict(zip(requests, outputs)), requests, errors, report)
