"""Decode stage: loads each prompt's KV payload into its own engine and continues generating
after the first token. A payload lost or damaged on the way is recomputed here or reported, by
kv.on_load_failure; one made for another engine is always refused."""
import logging
import uuid

import pyarrow as pa

from pipeline.columns import ERROR, FINISH_REASON, GENERATED_TOKENS, KV_FILE, KV_PAYLOAD, with_columns
from pipeline.config import OnLoadFailure
from pipeline.engine import CONSUMER, sampling_params
from pipeline.kv import handoff, payload
from pipeline.kv.payload import KVPayload, PayloadError, PayloadLost, PayloadMismatch
from pipeline.metrics import BatchReport
from pipeline.stages.engine_stage import EngineStage

log = logging.getLogger(__name__)


class Decode(EngineStage):
    stage = "decode"
    kv_role = CONSUMER

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        tokens = batch.column(GENERATED_TOKENS).to_pylist()
        finish = batch.column(FINISH_REASON).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        with handoff.timed():
            payloads = payload.from_column(batch)
        files: list[str | None] = [None] * batch.num_rows  # to remove once the row is committed
        keys: dict[int, str | None] = {}  # row -> handoff key; None: the engine prefills the prompt itself
        for i in rows:
            try:
                with handoff.timed():
                    loaded = self.fetch(payloads[i])
                    kv = loaded.decode(self.model, len(prompts[i]))
            except PayloadError as error:
                if isinstance(error, PayloadLost) and self.kv.on_load_failure is OnLoadFailure.recompute:
                    log.warning("row %d: %s; recomputing its prefill", i, error)
                    keys[i] = None
                else:
                    errors[i] = str(error)
                continue
            files[i] = loaded.file
            keys[i] = uuid.uuid4().hex
            handoff.offer(keys[i], kv)
            report.kv_bytes += loaded.data.nbytes
            report.kv_tokens += loaded.num_tokens
        try:
            # The prompt plus the first token: with a payload, the engine loads the prompt's KV
            # and computes only the first token's.
            outputs = await self.generate(
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
        report.rows = len(keys)
        report.output_tokens = sum(len(tokens[i]) - 1 for i in keys)
        report.kv_recomputed = sum(key is None for key in keys.values())
        report.kv_handoff_seconds = handoff.seconds.take()
        report.preempted = int(handoff.preemptions.take())
        batch = with_columns(
            self.with_generation(batch, tokens, finish),
            **{ERROR: pa.array(errors, pa.string()), KV_FILE: pa.array(files, pa.string())},
        )
        return batch.drop_columns([KV_PAYLOAD])

    def fetch(self, p: KVPayload | None) -> KVPayload:
        """The payload with its bytes at hand."""
        if p is None:
            raise PayloadLost("kv_missing", "KV payload is missing")
        if p.file is None:
            return p
        if self.store is None:
            raise PayloadMismatch("kv_mismatch", f"KV payload is in file {p.file}; set kv.storage_path to its root")
        return self.store.fetch(p)
