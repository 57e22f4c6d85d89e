"""Prefill stage: computes each prompt's KV, or whatever its model keeps (pipeline/engine/family.py),
and, greedily, a first token, which a prefill dataset keeps, and emits it as a payload column for
the decode pool (inline, or as a file name with kv.transport=storage); the leading blocks a
prompt shares with others are stored once and named (pipeline/kv/blocks.py). Every token of the
completion is the decode engine's, sampled there as the row asks, so a seeded row draws the same
tokens as in one engine. A row's KV is computed under its LoRA adapter, whose identity its payload
and its shared blocks' hashes carry (pipeline/engine/lora.py), and of its images, if any: this
engine runs the vision encoder, the payload carries the images' identity, and the prompt goes on
to decode as the engine expanded it (with its image tokens). Such a row shares no blocks.

A model with recurrent layers is given the prompt without its last token: their state cannot be
rewound, and decode computes that token again. Such a row has no first token, and a one-token
prompt needs no prefill at all."""

import uuid
from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from pipeline.columns import (
    ERROR,
    GENERATED_TOKENS,
    IMAGES,
    IMAGES_DIGEST,
    KV_PAYLOAD,
    NUM_INPUT_TOKENS,
    PROMPT_TOKENS,
    ROW,
    TOKEN_LIST,
    ErrorKind,
    row_error,
    with_columns,
)
from pipeline.config import Transport
from pipeline.engine.build import PRODUCER
from pipeline.engine.loop import RequestRefused
from pipeline.job.meter import BatchReport
from pipeline.kv import handoff, payload
from pipeline.kv.blocks import BatchShares, Holders, PrefixTracker, block_hashes, block_key, keys_of, salt
from pipeline.kv.codec import codec
from pipeline.kv.payload import KVPayload, checksum
from pipeline.stages.engine_stage import EngineStage, Request


class Prefill(EngineStage):
    stage = "prefill"
    kv_role = PRODUCER

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_tokens = self.kv.shared_block_tokens
        # A sliding window's KV starts past the prompt's leading blocks, and recurrent layers
        # alone keep no KV: nothing to share.
        cache = self.model.cache
        self.sharing = bool(self.block_tokens and self.shared_blocks and cache.layers) and not cache.window
        self.tracker = PrefixTracker()

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        numbers = batch.column(ROW).to_pylist()
        # A row's sampling is the decode engine's to apply, from the first token on; a bad value
        # is refused here, before the row's KV is computed. Its adapter applies here too.
        requests = self.requests(batch, rows, prompts, errors)
        self.refuse_images(requests, errors)
        # A row with images: its prompt grows by the engine's image tokens, and what is carried
        # is known once it ran (prefill()); the whole prompt is, on a model whose KV covers it.
        carried = {i: self.model.cache.carried(len(prompts[i])) for i in requests}
        keys = {i: uuid.uuid4().hex for i, (_, stop) in carried.items() if stop}
        shares = BatchShares({}, {}, {})
        if self.sharing:
            chains = {
                i: block_hashes(
                    prompts[i][: carried[i][1]], self.block_tokens, self.block_salt(requests[i].conditioning)
                )
                for i in keys
                if not requests[i].images
            }
            shares = self.tracker.plan(chains, numbers, self.shared_blocks)
        try:
            tokens, payloads = await self.prefill(
                keys,
                prompts,
                requests=requests,
                carried=carried,
                numbers=numbers,
                shares=shares,
                errors=errors,
                report=report,
            )
        except BaseException:
            # The batch is redone elsewhere, holding its blocks anew.
            self.give_back(shares, numbers, keys)
            raise
        # Rows that name blocks but carry no payload (refused by the engine, or their blocks'
        # supplier was) never reach decode.
        self.give_back(shares, numbers, [i for i in keys if payloads[i] is None])
        with handoff.timed():
            column = payload.to_column(payloads)
        report.rows = len(rows)
        report.input_tokens = sum(len(prompts[i]) for i in rows)
        report.output_tokens = sum(1 for t in tokens if t)
        report.kv_handoff_seconds = handoff.seconds.take()
        report.preempted = int(handoff.preemptions.take())
        columns = {
            GENERATED_TOKENS: pa.array(tokens, TOKEN_LIST),
            ERROR: pa.array(errors, pa.string()),
            KV_PAYLOAD: column,
        }
        if IMAGES in batch.column_names:  # decode gets the expanded prompt and its images' identity
            digests = [
                requests[i].images.digest if i in requests and requests[i].images else None for i in range(len(prompts))
            ]
            columns[PROMPT_TOKENS] = pa.array(prompts, TOKEN_LIST)
            columns[NUM_INPUT_TOKENS] = pa.array([len(p) for p in prompts], pa.int32())
            columns[IMAGES_DIGEST] = pa.array(digests, pa.string())
            batch = batch.drop_columns([IMAGES])  # their KV travels instead
        return with_columns(batch, **columns)

    def refuse_images(self, requests: dict[int, Request], errors: list[str | None]) -> None:
        """Rows with images on a model whose handoff carries part of a prompt (a sliding window,
        recurrent state): where the part starts depends on the image tokens the engine adds."""
        if self.model.cache.carried(2) == (0, 2):
            return
        for i in [i for i, r in requests.items() if r.images]:
            del requests[i]
            errors[i] = row_error(
                ErrorKind.engine_refused, "the KV handoff of rows with images needs a model whose KV covers the prompt"
            )

    async def prefill(
        self,
        keys: dict[int, str],
        prompts: list[list[int]],
        *,
        requests: dict[int, Request],
        carried: dict[int, tuple[int, int]],
        numbers: list[int],
        shares: BatchShares,
        errors: list[str | None],
        report: BatchReport,
    ) -> tuple[list, list[KVPayload | None]]:
        """Runs the requests (`keys`: row -> handoff key), each under its row's adapter, on the
        tokens whose KV they carry (`carried`: row -> [first, stop)): each row's first token and
        payload."""
        # The engine saves a row's KV from the first block it must carry or supply.
        starts = {i: max(shares.save_from(i) * self.block_tokens, carried[i][0]) for i in keys}
        outputs = await self.generate(
            [prompts[i][: carried[i][1]] for i in keys],
            [replace(requests[i], params=self.sampling.prefill(key, starts[i])) for i, key in keys.items()],
            report,
        )
        tokens: list = [[] if i in carried else None for i in range(len(prompts))]
        saved: dict[int, np.ndarray] = {}
        for (i, key), out in zip(keys.items(), outputs):
            if isinstance(out, RequestRefused):
                errors[i], tokens[i] = row_error(ErrorKind.engine_refused, out.reason), None
                continue
            if requests[i].images:  # the prompt as the engine expanded it, image tokens and all
                prompts[i] = list(out.prompt_token_ids)
                carried[i] = (0, len(prompts[i]))
            if carried[i][1] == len(prompts[i]):  # the whole prompt ran: its token is the first
                tokens[i] = list(out.outputs[0].token_ids)
            with handoff.timed():
                saved[i] = handoff.take_saved(key).result()
            report.kv_tokens += carried[i][1] - carried[i][0]
        with handoff.timed():
            conditions = {i: requests[i].conditioning for i in saved}
            payloads = self.payloads(
                saved, carried, conditions=conditions, numbers=numbers, shares=shares, report=report
            )
        return tokens, payloads

    def block_salt(self, conditioning: str) -> bytes:
        """What a block's KV depends on besides its tokens, for a row of `conditioning`."""
        return salt(self.model.fingerprint, self.model.dtype, self.kv.codec.value, self.block_tokens, conditioning)

    def give_back(self, shares: BatchShares, numbers: list[int], rows: Iterable[int]) -> None:
        """The blocks these rows hold (`rows`: indices in the batch) are not theirs any more."""
        named = [numbers[i] for i in rows if shares.named.get(i)]
        if named:
            self.shared_blocks.release(named)

    def payloads(
        self,
        saved: dict[int, np.ndarray],
        carried: dict[int, tuple[int, int]],
        *,
        conditions: dict[int, str],
        numbers: list[int],
        shares: BatchShares,
        report: BatchReport,
    ) -> list[KVPayload | None]:
        """Each row's payload from the KV its engine saved (under the adapter of digest
        `conditions[row]`): naming the shared blocks, carrying the rest. The shared blocks this batch
        supplies are stored, each from its supplier's KV."""
        model, codec_name = self.model, self.kv.codec.value
        block = codec(codec_name).nbytes(model.cache.token_shape(self.block_tokens), getattr(torch, model.dtype))
        checksums, fresh = dict(shares.held), {}
        payloads: list[KVPayload | None] = [None] * len(numbers)
        for i, data in saved.items():  # in row order: a block's supplier comes before the rows that name it
            hashes, first = shares.named.get(i, []), shares.save_from(i)
            for j, h in enumerate(hashes[first:], first):
                if shares.supplier.get(h) == i:
                    copy = data[(j - first) * block : (j - first + 1) * block]
                    checksums[h] = self.tracker.published[h] = checksum(copy)
                    fresh[block_key(h, checksums[h])] = copy
            if any(h not in checksums for h in hashes):  # its supplier was refused: decode recomputes it
                continue
            start, stop = carried[i]
            p = KVPayload.of(
                data[(len(hashes) - first) * block :],
                model.cache.token_shape(stop - start),
                model,
                codec_name,
                self.block_tokens,
                hashes,
                [checksums[h] for h in hashes],
                first_token=start,
                conditioning=conditions[i],
            )
            payloads[i] = self.store.put(p) if self.kv.transport is Transport.storage else p
            report.kv_bytes += p.data.nbytes
            report.kv_blocks_referenced += len(hashes)
        if fresh:
            named = {numbers[i]: set(keys_of(p)) for i, p in enumerate(payloads) if p is not None}
            holders: Holders = {key: {row for row, keys in named.items() if key in keys} for key in fresh}
            self.shared_blocks.put(fresh, holders)
        report.kv_blocks_stored += len(fresh)
        report.kv_bytes += sum(copy.nbytes for copy in fresh.values())
        return payloads
