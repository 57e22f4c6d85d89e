"""Decode stage: loads each prompt's KV payload into its own engine and continues generating
after the first token. A payload's shared blocks (pipeline/kv/blocks.py) come from the worker's
block cache, fetched once while it holds them. A payload lost or damaged on the way is
recomputed here or reported, by kv.on_load_failure; one made for another engine, or under
another LoRA adapter or of other images than its row's, is always refused. A row's images came
with their KV: this engine runs the language model alone.

A prefill dataset may come from anywhere and may have been edited, so each row is checked
before its request reaches the engine: the engine refuses a bad request by failing its whole
batch, and a payload that does not match its prompt would give wrong tokens silently."""

import logging
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.columns import (
    ERROR,
    GENERATED_TOKENS,
    IMAGES_DIGEST,
    KV_FILE,
    KV_PAYLOAD,
    NUM_INPUT_TOKENS,
    PROMPT_TOKENS,
    ROW,
    TOKEN_LIST,
    ErrorKind,
    row_error,
    with_columns,
)
from pipeline.config import OnLoadFailure
from pipeline.engine.build import CONSUMER
from pipeline.engine.model import ResolvedModel
from pipeline.engine.sampling import with_kv_key
from pipeline.job.meter import BatchReport
from pipeline.kv import handoff, payload
from pipeline.kv.blocks import BlockCache, Fetched, keys_of
from pipeline.kv.payload import KVPayload, PayloadError, PayloadLost, PayloadMismatch
from pipeline.kv.store import PayloadStore
from pipeline.stages.engine_stage import EngineStage

log = logging.getLogger(__name__)


class Decode(EngineStage):
    stage = "decode"
    kv_role = CONSUMER

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from transformers import AutoConfig

        # Token ids are checked before the engine sees them (it fails the whole batch on one).
        self.vocab_size = AutoConfig.from_pretrained(self.model.path).get_text_config().vocab_size
        self.block_cache = BlockCache(self.shared_blocks, int(self.kv.block_cache_gib * (1 << 30)))

    async def process(
        self, batch: pa.Table, rows: list[int], prompts: list[list[int]], report: BatchReport
    ) -> pa.Table:
        first = batch.column(GENERATED_TOKENS).to_pylist()
        errors = batch.column(ERROR).to_pylist()
        num_input = batch.column(NUM_INPUT_TOKENS).to_pylist()
        numbers = batch.column(ROW).to_pylist()
        with handoff.timed():
            payloads = payload.from_column(batch) if rows else []
        files: list[str | None] = [None] * batch.num_rows  # to remove once the row is committed
        for i in rows:
            errors[i] = check_prefilled(
                prompts[i],
                first[i],
                self.vocab_size,
                self.model.max_model_len,
                0 if self.model.cache.state_layers else 1,
            )
        requests = self.requests(batch, [i for i in rows if errors[i] is None], prompts, errors)
        # A payload is checked against the engine before anything it names is fetched.
        for i in requests:
            payloads[i] = checked(payloads[i], self.model, len(prompts[i]), requests[i].conditioning)
        with handoff.timed():
            blocks = self.fetch_shared([payloads[i] for i in requests], report)
        keys: dict[int, str | None] = {}  # row -> handoff key; None: the engine prefills the prompt itself
        recomputed = 0
        for i in requests:
            num_input[i] = len(prompts[i])  # the prompt's, whatever the dataset says
            start, stop = self.model.cache.carried(len(prompts[i]))
            if start == stop:  # a one-token prompt of a model with recurrent layers: nothing was computed
                keys[i] = None
                continue
            try:
                with handoff.timed():
                    loaded = load(
                        payloads[i], self.model, len(prompts[i]), self.store, conditioning=requests[i].conditioning
                    )
                    shared = shared_of(loaded, blocks)
                    kv = loaded.upload(handoff.copies, shared)
            except PayloadError as error:
                # A row's images cannot be recomputed here: this engine has no vision encoder.
                recompute = self.kv.on_load_failure is OnLoadFailure.recompute and not requests[i].images_digest
                if isinstance(error, PayloadLost) and recompute:
                    log.warning("row %d: %s; recomputing its prefill", i, error)
                    keys[i] = None
                    recomputed += 1
                else:
                    errors[i] = str(error)
                continue
            files[i] = loaded.file
            keys[i] = uuid.uuid4().hex
            handoff.offer(keys[i], kv)
            report.kv_bytes += loaded.data.nbytes
            report.kv_tokens += loaded.num_tokens
            report.kv_blocks_referenced += len(shared)
        try:
            # The prompt alone: the engine loads the KV of all its tokens but the last, computes
            # that one's, and samples every token of the completion itself.
            outputs = await self.generate(
                [prompts[i] for i in keys],
                [replace(requests[i], params=with_kv_key(requests[i].params, key)) for i, key in keys.items()],
                report,
            )
        finally:
            for key in keys.values():
                if key:
                    handoff.withdraw(key)
        # The rows are done with their shared blocks, whatever became of them (a batch that
        # failed keeps them for its retry).
        if self.shared_blocks:
            self.shared_blocks.release([numbers[i] for i in rows])
        report.rows = len(keys)
        report.kv_recomputed = recomputed
        report.kv_handoff_seconds = handoff.seconds.take()
        report.preempted = int(handoff.preemptions.take())
        # A row refused here keeps no tokens: ids no tokenizer may know.
        pending_rows = set(rows)
        kept = [None if i in pending_rows and errors[i] else t for i, t in enumerate(first)]
        batch = with_columns(batch, **{GENERATED_TOKENS: pa.array(kept, TOKEN_LIST)})
        batch = self.with_completions(batch, dict(zip(keys, outputs)), requests, errors, report)
        batch = with_columns(
            batch,
            **{KV_FILE: pa.array(files, pa.string()), NUM_INPUT_TOKENS: pa.array(num_input, pa.int32())},
        )
        return batch.drop_columns([KV_PAYLOAD])

    def row_images(self, batch: pa.Table, rows: list[int], errors: list[str | None]) -> dict[int, dict]:
        """A row's images' identity, which prefill wrote: their KV comes in its payload, and
        this engine holds no vision encoder."""
        if IMAGES_DIGEST not in batch.column_names:
            return {}
        digests = batch.column(IMAGES_DIGEST).to_pylist()
        return {i: {"images_digest": digests[i]} for i in rows if digests[i]}

    def fetch_shared(self, payloads: list, report: BatchReport) -> Fetched:
        """The shared blocks the batch's payloads name, from the block cache (fetching those
        it lacks); the bytes fetched count as moved, the rest as saved."""
        named = [p for p in payloads if isinstance(p, KVPayload) and p.blocks]
        batch = Fetched({}, {}, set())
        if not named or not self.shared_blocks:
            return batch
        for folder in {p.folder for p in named}:  # one per prefill job
            got = self.block_cache.get({key for p in named if p.folder == folder for key in keys_of(p)}, folder)
            batch.found.update(got.found)
            batch.new.update(got.new)
            batch.corrupt.update(got.corrupt)
        fetched = sum(data.nbytes for data in batch.new.values())
        referenced = sum(len(p.blocks) * p.block_nbytes for p in named)
        report.kv_blocks_fetched += len(batch.new)
        report.kv_bytes += fetched
        report.kv_bytes_saved += max(referenced - fetched, 0)
        return batch


def shared_of(p: KVPayload, blocks: Fetched) -> list[np.ndarray]:
    """The bytes of the payload's shared blocks (fetched and checked by the block cache), or
    why there are none: a block it could not fetch, or fetched under another checksum."""
    keys = keys_of(p)
    for key in keys:
        if key in blocks.corrupt:
            raise PayloadLost(ErrorKind.kv_corrupt, f"KV block {key} fails its checksum")
        if key not in blocks.found:
            raise PayloadLost(ErrorKind.kv_missing, f"KV block {key} is missing from the job's block store")
    shared = [blocks.found[key] for key in keys]
    p.check_shared(shared)
    return shared


def checked(
    p: KVPayload | PayloadError | None, model: ResolvedModel, num_tokens: int, conditioning: str = ""
) -> KVPayload | PayloadError | None:
    """The payload if what it says of itself fits a prompt of `num_tokens` on `model` under the
    adapter of digest `conditioning`, else why not."""
    if isinstance(p, KVPayload):
        try:
            p.check(model, num_tokens, conditioning)
        except PayloadError as error:
            return error
    return p


def load(
    p: KVPayload | PayloadError | None,
    model: ResolvedModel,
    num_tokens: int,
    store: PayloadStore | None,
    *,
    conditioning: str = "",
) -> KVPayload:
    """A row's payload with its bytes at hand, verified (for adapter `conditioning`); a payload is
    checked against the engine before its file is read."""
    if isinstance(p, PayloadError):
        raise p
    if p is None:
        raise PayloadLost(ErrorKind.kv_missing, "KV payload is missing")
    p.check(model, num_tokens, conditioning)
    if p.file is not None:
        if store is None:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload is in file {p.file}; set kv.storage_path to its root"
            )
        p = store.fetch(p)
    p.verify(model, num_tokens, conditioning)
    return p


def check_prefilled(
    prompt: object, first: object, vocab_size: int, max_model_len: int, first_tokens: int = 1
) -> str | None:
    """Why a prefill dataset's row (its prompt and first token) cannot be decoded, or None.
    `first_tokens`: 1, or 0 for a model with recurrent layers, whose prefill stops before the
    prompt's last token."""
    for column, ids in ((PROMPT_TOKENS, prompt), (GENERATED_TOKENS, first)):
        if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
            return row_error(ErrorKind.invalid_token_ids, f"{column} must be a list of token ids in [0, {vocab_size})")
    if not prompt:
        return row_error(ErrorKind.empty_prompt, f"{PROMPT_TOKENS} is empty")
    if len(first) != first_tokens:
        return row_error(
            ErrorKind.invalid_first_token,
            f"{GENERATED_TOKENS} holds {len(first)} tokens; a prefilled row of this model holds {first_tokens}",
        )
    if len(prompt) >= max_model_len:
        return row_error(
            ErrorKind.overlong_prompt, f"prompt has {len(prompt)} tokens; model.max_model_len is {max_model_len}"
        )
    return None
