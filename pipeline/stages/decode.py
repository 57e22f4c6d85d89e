"""Decode stage: loads each prompt's KV payload into its own engine and continues generating
after the first token. A payload lost or damaged on the way is recomputed here or reported, by
kv.on_load_failure; one made for another engine is always refused."""
import logging
import uuid

import pyarrow as pa

from pipeline.columns import ERROR, FINISH_REASON, GENERATED_TOKENS, with_columns
from pipeline.config import OnLoadFailure
from pipeline.engine import CONSUMER, sampling_params
from pipeline.kv import handoff, payload
from pipeline.kv.payload import PayloadError, PayloadLost
from pipeline.metrics import BatchReport
from pipeline.stages.engine_stage import EngineStage

log = logging.getLogger(__name__)


class Decode(EngineStage):
    stage = "decode"
    kv_role = CONSUMER

    def process(self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport) -> pa.Table:
        tokens = batch.column(GENERATED_TOKENS).to_pylist()
        finish = batch.column(FINISH_REASON).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        payloads = payload.from_column(batch)
        keys: dict[int, str | None] = {}  # row -> handoff key; None: the engine prefills the prompt itself
        for i in rows:
            try:
                if payloads[i] is None:
                    raise PayloadLost("kv_missing", "KV payload is missing")
                kv = payloads[i].decode(self.model, len(prompts[i]))
            except PayloadError as error:
                if isinstance(error, PayloadLost) and self.kv.on_load_failure is OnLoadFailure.recompute:
                    log.warning("row %d: %s; recomputing its prefill", i, error)
                    keys[i] = None
                else:
                    errors[i] = str(error)
                continue
            keys[i] = uuid.uuid4().hex
            handoff.offer(keys[i], kv)
        try:
            # The prompt plus the first token: with a payload, the engine loads the prompt's KV
            # and computes only the first token's.
            outputs = self.generate(
                [prompts[i] + tokens[i] for i in keys],
                [sampling_params(self.sampling, self.budget(len(prompts[i])) - 1, key) for i, key in keys.items()],
            )
        finally:
            for key in keys.values():
                if key:
                    handoff.withdraw(key)
        for i, out in zip(keys, outputs):
            tokens[i] = tokens[i] + list(out.outputs[0].token_ids)
            finish[i] = out.outputs[0].finish_reason
        loaded = [i for i, key in keys.items() if key]
        report.rows = len(keys)
        report.output_tokens = sum(len(tokens[i]) - 1 for i in keys)
        report.kv_bytes = sum(payloads[i].data.nbytes for i in loaded)
        report.kv_tokens = sum(payloads[i].num_tokens for i in loaded)
        report.kv_recomputed = len(keys) - len(loaded)
        batch = self.with_generation(batch, tokens, finish)
        return with_columns(batch, **{ERROR: pa.array(errors, pa.string())}).drop_columns([payload.KV])
