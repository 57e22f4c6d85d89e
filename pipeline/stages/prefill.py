"""Prefill stage: computes each prompt's KV (and, greedily, a first token, which a prefill
dataset keeps), and emits the KV as a payload column for the decode pool (inline, or as a file
name with kv.transport=storage); the leading blocks a prompt shares with others are stored once
and named (pipeline/kv/blocks.py). Every token of the completion is the decode engine's, sampled
there as the row asks, so a seeded row draws the same tokens as in one engine."""

import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.columns import ERROR, GENERATED_TOKENS, KV_PAYLOAD, TOKEN_LIST, ErrorKind, row_error, with_columns
from pipeline.config import Transport
from pipeline.engine.build import PRODUCER
from pipeline.engine.loop import RequestRefused
from pipeline.job.meter import BatchReport
from pipeline.kv import handoff, payload
from pipeline.kv.blocks import PrefixTracker, block_hashes, block_key, keys_of, salt
from pipeline.kv.payload import KVPayload
from pipeline.stages.engine_stage import EngineStage


class Prefill(EngineStage):
    stage = "prefill"
    kv_role = PRODUCER

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_tokens = self.kv.shared_block_tokens
        self.sharing = bool(self.block_tokens and self.shared_blocks)
        self.salt = salt(self.model.fingerprint, self.model.dtype, self.kv.codec.value, self.block_tokens)
        self.tracker = PrefixTracker()

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        # A row's sampling is the decode engine's to apply, from the first token on; a bad value
        # is refused here, before the row's KV is computed.
        keys = {i: uuid.uuid4().hex for i in self.requests(batch, rows, prompts, errors)}
        chains = {i: block_hashes(prompts[i], self.block_tokens, self.salt) for i in keys if self.sharing}
        shared = dict(zip(chains, self.tracker.shared(list(chains.values()))))
        outputs = await self.generate([prompts[i] for i in keys], [self.sampling.prefill(key) for key in keys.values()])
        tokens: list = [None] * batch.num_rows
        encoded: dict[int, KVPayload] = {}
        for (i, key), out in zip(keys.items(), outputs):
            if isinstance(out, RequestRefused):
                errors[i] = row_error(ErrorKind.engine_refused, out.reason)
                continue
            saved = handoff.take_saved(key)
            tokens[i] = list(out.outputs[0].token_ids)
            with handoff.timed():
                encoded[i] = KVPayload.of(
                    saved.result(), saved.shape, self.model, self.kv.codec.value, self.block_tokens
                )
            report.kv_tokens += encoded[i].num_tokens
        payloads: list[KVPayload | None] = [None] * batch.num_rows
        with handoff.timed():
            if self.sharing:
                self.share(encoded, {i: chains[i][: shared[i]] for i in encoded}, report)
            for i, p in encoded.items():
                payloads[i] = self.store.put(p) if self.kv.transport is Transport.storage else p
                report.kv_bytes += p.data.nbytes
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

    def share(self, encoded: dict[int, KVPayload], named: dict[int, list[bytes]], report: BatchReport) -> None:
        """Each row's payload naming its shared blocks (`named`, by hash) instead of carrying
        them; the blocks the store lacks are stored, from the first row that has them."""
        published = self.tracker.published
        known = {h: block_key(h, published[h]) for hashes in named.values() for h in hashes if h in published}
        held = self.shared_blocks.hold(Counter(known[h] for hashes in named.values() for h in hashes if h in known))
        self.tracker.forget([h for h, key in known.items() if key not in held])
        fresh: dict[str, np.ndarray] = {}
        for i, hashes in named.items():
            if not hashes:
                continue
            encoded[i], stored = encoded[i].share(hashes, published)
            sums = dict(zip(encoded[i].blocks, encoded[i].block_checksums))
            for h, data in stored.items():
                published[h] = sums[h]
                fresh[block_key(h, sums[h])] = data
            report.kv_blocks_referenced += len(hashes)
        uses = Counter(key for p in encoded.values() for key in keys_of(p) if key not in held)
        self.shared_blocks.put(fresh, uses)
        report.kv_blocks_stored += len(fresh)
        report.kv_bytes += sum(data.nbytes for data in fresh.values())
