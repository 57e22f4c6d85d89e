"""The KV payload column: Arrow and Parquet round trips for every codec and cache dtype, reads
that do not copy, and refusal of payloads that are damaged or made for another engine. And a
prefill dataset's rows as the decode stage reads them: every field of the payload and every
column the stage uses, crafted, ends in a row error of a named kind or in the same KV."""

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.columns import GENERATED_TOKENS, KV_PAYLOAD, PROMPT_TOKENS
from pipeline.config import Codec
from pipeline.engine.family import Family
from pipeline.job.meter import BatchReport
from pipeline.kv import payload
from pipeline.kv.blocks import BlockCache, Fetched, FileBlocks, block_key
from pipeline.kv.payload import TYPE, KVPayload, PayloadError, PayloadLost, PayloadMismatch
from pipeline.kv.store import PayloadStore
from pipeline.stages.decode import Decode, check_prefilled, checked, load, shared_of


def _kv(model, tokens: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cache.token_shape(tokens), generator=g).to(dtype)


def _meta(p: KVPayload) -> dict:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "data"}


@pytest.mark.parametrize("codec", [c.value for c in Codec])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_payload_round_trips_through_parquet(model, codec, dtype, tmp_path):
    model = dataclasses.replace(model, dtype=dtype)
    kvs = [_kv(model, n, getattr(torch, dtype), seed=n) if n else None for n in (5, 0, 128, 1)]
    sent = [KVPayload.encode(kv, model, codec) if kv is not None else None for kv in kvs]
    pq.write_table(pa.table({KV_PAYLOAD: payload.to_column(sent)}), tmp_path / "kv.parquet")
    got = payload.from_column(pq.read_table(tmp_path / "kv.parquet"))
    assert got[1] is None
    for kv, a, b in zip(kvs, sent, got):
        if kv is None:
            continue
        assert _meta(a) == _meta(b) and np.array_equal(a.data, b.data)
        decoded = b.decode(model, kv.shape[2])
        assert decoded.dtype == kv.dtype and decoded.shape == kv.shape
        if codec == "none":
            assert torch.equal(decoded, kv)
        else:
            assert torch.allclose(decoded.float(), kv.float(), atol=0.15 * kv.float().abs().max().item())


def test_payload_bytes_are_copied_neither_into_the_column_nor_out_of_it(model, tmp_path):
    sent = [KVPayload.encode(_kv(model, n), model, "none") for n in (3, 4)]
    column = payload.to_column(sent)
    for p, chunk in zip(sent, column.chunks, strict=True):
        assert np.shares_memory(p.data, np.frombuffer(chunk.field("data").buffers()[2], np.uint8))
    # Parquet reads both rows into one chunk; the slice is an offset into its buffers.
    pq.write_table(pa.table({KV_PAYLOAD: column}), tmp_path / "kv.parquet")
    table = pq.read_table(tmp_path / "kv.parquet").slice(1)
    (got,) = payload.from_column(table)
    data = table.column(KV_PAYLOAD).chunk(0).field("data").buffers()[2]
    assert np.shares_memory(got.data, np.frombuffer(data, np.uint8))
    assert torch.equal(got.decode(model, 4), _kv(model, 4))


def test_payload_for_another_engine_is_refused(model):
    good = KVPayload.encode(_kv(model, 9), model, "none")
    good.decode(model, 9)
    cases = [
        (
            dataclasses.replace(good, fingerprint="0123456789abcdef"),
            9,
            "kv_mismatch: KV payload is from model 0123456789abcdef",
        ),
        (good, 10, "kv_mismatch: KV payload shape"),
        (dataclasses.replace(good, dtype="float16"), 9, "kv_mismatch: KV payload dtype float16"),
        (dataclasses.replace(good, format=1), 9, "kv_mismatch: KV payload format 1"),
    ]
    for bad, tokens, message in cases:
        with pytest.raises(PayloadMismatch) as error:
            bad.decode(model, tokens)
        assert str(error.value).startswith(message)


def test_damaged_payload_fails_its_checksum(model):
    good = KVPayload.encode(_kv(model, 9), model, "int8")
    data = good.data.copy()
    data[len(data) // 2] ^= 1
    with pytest.raises(PayloadLost, match="^kv_corrupt: KV payload fails its checksum"):
        dataclasses.replace(good, data=data).decode(model, 9)


TOKENS = 9
VOCAB = 49152


def _written(column: pa.Array, tmp_path) -> pa.Table:
    """The payload column as decode reads it: from Parquet, in the types it was written in."""
    pq.write_table(pa.table({KV_PAYLOAD: column}), tmp_path / "prefilled.parquet")
    return pq.read_table(tmp_path / "prefilled.parquet")


def _struct(p: KVPayload, **replaced: pa.Array) -> pa.StructArray:
    """The payload's one-row struct, with fields replaced (or added) by name."""
    fields = {f.name: payload.to_column([p]).chunk(0).field(f.name) for f in TYPE}
    fields.update(replaced)
    return pa.StructArray.from_arrays(list(fields.values()), names=list(fields))


def _outcome(table: pa.Table, model) -> str | torch.Tensor:
    """The KV the decode stage would load for the row, or the kind of its row error."""
    (p,) = payload.from_column(table)
    try:
        loaded = load(p, model, TOKENS, None)
        return loaded.upload(None, shared_of(loaded, Fetched({}, {}, set()))).to_device(0)[0]
    except PayloadError as error:
        return str(error).split(":", 1)[0]


def _other_bytes(p: KVPayload, data: np.ndarray) -> dict[str, pa.Array]:
    """Other bytes under their own valid checksum."""
    return {
        "data": pa.array([data.tobytes()], pa.large_binary()),
        "checksum": pa.array([payload.checksum(data, p.block_tokens)], pa.uint64()),
    }


def _crafted(p: KVPayload) -> list[tuple[str, dict[str, pa.Array], str]]:
    """(field, replaced fields, expected error kind): each field of the payload struct made wrong."""
    shape = list(p.shape)
    return [
        ("format", {"format": pa.array([1], pa.int16())}, "kv_mismatch"),
        ("format", {"format": pa.array([None], pa.int16())}, "kv_corrupt"),
        ("format", {"format": pa.array([70000], pa.int32())}, "kv_mismatch"),  # beyond the field's type
        ("fingerprint", {"fingerprint": pa.array(["0123456789abcdef"])}, "kv_mismatch"),
        ("fingerprint", {"fingerprint": pa.array([None], pa.string())}, "kv_corrupt"),
        ("fingerprint", {"fingerprint": pa.array([b"\xff"], pa.binary()).view(pa.string())}, "kv_mismatch"),
        ("dtype", {"dtype": pa.array(["float16"])}, "kv_mismatch"),
        ("dtype", {"dtype": pa.array(["complex256"])}, "kv_mismatch"),
        ("dtype", {"dtype": pa.array([None], pa.string())}, "kv_corrupt"),
        ("codec", {"codec": pa.array(["zstd"])}, "kv_mismatch"),
        ("codec", {"codec": pa.array(["int8"])}, "kv_corrupt"),  # raw bytes that int8 would misread
        ("codec", {"codec": pa.array([None], pa.string())}, "kv_corrupt"),
        ("shape", {"shape": pa.array([[shape[0], 2, TOKENS + 1, *shape[3:]]], pa.list_(pa.int32()))}, "kv_mismatch"),
        ("shape", {"shape": pa.array([[-shape[0], 2, TOKENS, *shape[3:]]], pa.list_(pa.int32()))}, "kv_mismatch"),
        ("shape", {"shape": pa.array([shape[:4]], pa.list_(pa.int32()))}, "kv_mismatch"),
        ("shape", {"shape": pa.array([None], pa.list_(pa.int32()))}, "kv_corrupt"),
        ("shape", {"shape": pa.array([[shape[0], None, *shape[2:]]], pa.list_(pa.int32()))}, "kv_corrupt"),
        ("checksum", {"checksum": pa.array([p.checksum ^ 1], pa.uint64())}, "kv_corrupt"),
        ("checksum", {"checksum": pa.array([None], pa.uint64())}, "kv_corrupt"),
        ("checksum", {"checksum": pa.array([-1], pa.int64())}, "kv_mismatch"),
        ("data", _other_bytes(p, p.data[:-4]), "kv_corrupt"),
        ("data", _other_bytes(p, np.concatenate([p.data, p.data[:4]])), "kv_corrupt"),
        ("data", {"data": pa.array([None], pa.large_binary())}, "kv_corrupt"),
        ("file", {"file": pa.array([f"{'0' * 16}/{'0' * 32}.kv"])}, "kv_mismatch"),  # no kv.storage_path
        ("block_tokens", {"block_tokens": pa.array([-4], pa.int32())}, "kv_mismatch"),
        ("block_tokens", {"block_tokens": pa.array([4], pa.int32())}, "kv_corrupt"),  # the bytes read in other blocks
        ("block_tokens", {"block_tokens": pa.array([None], pa.int32())}, "kv_corrupt"),
        (
            "blocks",
            {"blocks": pa.array([[b"h" * 16]], BLOCKS), "block_checksums": pa.array([[1]], SUMS)},
            "kv_mismatch",
        ),
        ("blocks", {"blocks": pa.array([None], BLOCKS)}, "kv_corrupt"),
        ("blocks", {"blocks": pa.array([[None]], BLOCKS), "block_checksums": pa.array([[1]], SUMS)}, "kv_corrupt"),
        ("block_checksums", {"block_checksums": pa.array([[1]], SUMS)}, "kv_corrupt"),  # for no block
        (
            "blocks",  # a hash of another length than its format's
            {
                "block_tokens": pa.array([4], pa.int32()),
                "blocks": pa.array([[b"h" * 15]], pa.list_(pa.binary(15))),
                "block_checksums": pa.array([[1]], SUMS),
            },
            "kv_corrupt",
        ),
        (
            "blocks",  # a million blocks of one token for a prompt of nine
            {
                "block_tokens": pa.array([1], pa.int32()),
                "blocks": pa.array([[b"h" * 32] * 1_000_000], BLOCKS),
                "block_checksums": pa.array([[1] * 1_000_000], SUMS),
            },
            "kv_mismatch",
        ),
        ("block_checksums", {"block_checksums": pa.array([None], SUMS)}, "kv_corrupt"),
        ("family", {"family": pa.array(["mla"])}, "kv_mismatch"),  # a cache of another family
        ("family", {"family": pa.array([None], pa.string())}, "kv_corrupt"),
        ("first_token", {"first_token": pa.array([1], pa.int32())}, "kv_mismatch"),  # as if a window's
        ("first_token", {"first_token": pa.array([None], pa.int32())}, "kv_corrupt"),
        ("state_bytes", {"state_bytes": pa.array([4], pa.int64())}, "kv_mismatch"),  # state of a hybrid model
        ("state_bytes", {"state_bytes": pa.array([None], pa.int64())}, "kv_corrupt"),
        (
            "conditioning",
            {"conditioning": pa.array(["0" * 32])},
            "kv_mismatch",
        ),  # computed under an adapter the row lacks
        ("conditioning", {"conditioning": pa.array([None], pa.string())}, "kv_corrupt"),
    ]


BLOCKS, SUMS = TYPE.field("blocks").type, TYPE.field("block_checksums").type


def test_every_crafted_payload_field_is_a_row_error_of_its_kind(model, tmp_path):
    good = KVPayload.encode(_kv(model, TOKENS), model, "none")
    assert torch.equal(_outcome(_written(_struct(good), tmp_path), model), _kv(model, TOKENS))
    cases = _crafted(good)
    assert {field for field, _, _ in cases} == set(TYPE.names)
    got = [(field, _outcome(_written(_struct(good, **replaced), tmp_path), model)) for field, replaced, _ in cases]
    assert got == [(field, kind) for field, _, kind in cases]


@pytest.mark.parametrize(
    "field, value",
    [
        ("format", pa.array([70000], pa.int32())),
        ("checksum", pa.array([-1], pa.decimal128(20, 0))),  # wide enough for the good rows' too
        ("fingerprint", pa.array([b"\xff"], pa.binary()).view(pa.string())),
    ],
)
def test_a_value_that_does_not_fit_fails_its_row_alone(model, tmp_path, field, value):
    """A format, checksum or text no kvrelay type holds, in one row of a chunk: the rows beside
    it are read as they are."""
    good = KVPayload.encode(_kv(model, TOKENS), model, "none")
    bad = _struct(good, **{field: value})
    column = pa.concat_arrays([_struct(good).cast(bad.type), bad, _struct(good).cast(bad.type)])
    first, crafted, last = payload.from_column(_written(column, tmp_path))
    assert isinstance(crafted, PayloadMismatch) and str(crafted).startswith("kv_mismatch: KV payload")
    assert torch.equal(first.decode(model, TOKENS), last.decode(model, TOKENS))


def test_a_payload_names_its_shared_blocks_and_carries_the_rest(model, tmp_path):
    """Blocks named by content round-trip through Parquet; with their bytes the KV is the
    prompt's, without them the row's KV is missing, with bytes of another size it is corrupt
    (other bytes of the size: test_blocks, the decode cache checks them as it fetches)."""
    kv = _kv(model, TOKENS)
    whole = KVPayload.encode(kv, model, "none", block_tokens=4)
    size = whole.block_nbytes
    blocks = [whole.data[:size], whole.data[size : 2 * size]]
    hashes, sums = [b"a" * 32, b"b" * 32], [payload.checksum(b) for b in blocks]
    shared = KVPayload.of(whole.data[2 * size :], whole.shape, model, "none", 4, hashes, sums)
    assert shared.shared_tokens == 8 and shared.own_shape[2] == 1 and shared.data.size == shared.nbytes
    (read,) = payload.from_column(_written(payload.to_column([shared]), tmp_path))
    assert _meta(read) == _meta(shared)
    assert torch.equal(read.decode(model, TOKENS, blocks), kv)
    assert torch.equal(read.upload(None, blocks).to_device(4)[0], kv[:, :, 4:])  # the engine has 4 tokens
    assert _outcome(_written(payload.to_column([shared]), tmp_path), model) == "kv_missing"
    with pytest.raises(PayloadLost, match="^kv_corrupt: KV block"):
        read.check_shared([blocks[0], blocks[1][:-1]])


def test_a_format_3_payload_is_still_read(model, tmp_path):
    """Format 3 named shared blocks by 16-byte hashes, in a column of fixed-size binary."""
    kv = _kv(model, TOKENS)
    whole = KVPayload.encode(kv, model, "none", block_tokens=4)
    block = whole.data[: whole.block_nbytes]
    old = dataclasses.replace(
        KVPayload.of(
            whole.data[whole.block_nbytes :], whole.shape, model, "none", 4, [b"a" * 16], [payload.checksum(block)]
        ),
        format=3,
    )
    column = _struct(old, blocks=pa.array([[b"a" * 16]], pa.list_(pa.binary(16))))
    # Written before format 5 added what a payload carries: attention KV from token 0.
    column = pa.StructArray.from_arrays(
        [column.field(name) for name in TYPE.names if name not in payload.ADDED],
        names=[name for name in TYPE.names if name not in payload.ADDED],
    )
    (read,) = payload.from_column(_written(column, tmp_path))
    assert read.format == 3 and read.blocks == (b"a" * 16,)
    assert torch.equal(read.decode(model, TOKENS, [block]), kv)
    with pytest.raises(PayloadLost, match="shared blocks and their checksums do not match"):
        dataclasses.replace(read, format=4).check(model, TOKENS)  # format 4 names blocks by 32 bytes


def test_a_payload_is_checked_before_any_block_it_names_is_fetched(model, tmp_path):
    """A row naming a codec or dtype of a newer or foreign writer, or more blocks than its
    prompt has, is its own error; the blocks it names are never asked for."""
    store = PayloadStore(str(tmp_path), "0" * 16)
    fetches = []
    blocks = FileBlocks(store)
    blocks.fetch = lambda keys, folder: fetches.append(keys) or {}
    decode = SimpleNamespace(shared_blocks=blocks, block_cache=BlockCache(blocks, 1 << 20))
    whole = KVPayload.encode(_kv(model, TOKENS), model, "none", block_tokens=4)
    named = KVPayload.of(whole.data[whole.block_nbytes :], whole.shape, model, "none", 4, [b"a" * 32], [1])
    crafted = [
        dataclasses.replace(named, codec="zstd-9"),
        dataclasses.replace(named, dtype="float8_e8m0fnu"),
        dataclasses.replace(named, block_tokens=1, blocks=(b"a" * 32,) * 10**6, block_checksums=(1,) * 10**6),
    ]
    checked_ = [checked(p, model, TOKENS) for p in crafted]
    assert all(isinstance(p, PayloadMismatch) for p in checked_)
    Decode.fetch_shared(decode, checked_, BatchReport())
    assert fetches == []
    Decode.fetch_shared(decode, [checked(named, model, TOKENS)], BatchReport())
    assert fetches == [[block_key(b"a" * 32, 1)]]


def test_payload_columns_that_hold_the_same_values_are_read(model, tmp_path):
    """As other writers store them: bytes as binary (Spark), fields in another order, wider
    integers, one field more."""
    good = KVPayload.encode(_kv(model, TOKENS), model, "int8")
    fields = {f.name: _struct(good).field(f.name) for f in TYPE}
    widened = {
        **fields,
        "data": fields["data"].cast(pa.binary()),
        "format": fields["format"].cast(pa.int64()),
        "shape": fields["shape"].cast(pa.large_list(pa.int64())),
        "note": pa.array(["made elsewhere"]),
    }
    reordered = dict(reversed(widened.items()))
    column = pa.StructArray.from_arrays(list(reordered.values()), names=list(reordered))
    loaded = _outcome(_written(column, tmp_path), model)
    assert torch.equal(loaded, good.decode(model, TOKENS))


@pytest.mark.parametrize(
    "column",
    [
        pa.array(["not a payload"]),
        pa.StructArray.from_arrays([pa.array([2], pa.int16())], names=["format"]),  # fields missing
        pa.StructArray.from_arrays([pa.array(["two"])], names=["format"]),  # a field not of its type
    ],
)
def test_a_payload_column_of_another_type_fails_every_row(model, column, tmp_path):
    table = _written(pa.concat_arrays([column, column]), tmp_path)
    errors = payload.from_column(table)
    assert len(errors) == 2 and all(isinstance(e, PayloadMismatch) for e in errors)
    assert str(errors[0]).startswith("kv_mismatch: KV payload column is ")


PROMPT = list(range(100, 100 + TOKENS))


@pytest.mark.parametrize(
    "prompt, first, kind",
    [
        (PROMPT, [7], None),
        (None, [7], "invalid_token_ids"),
        ("100 101 102", [7], "invalid_token_ids"),
        ([], [7], "empty_prompt"),
        ([*PROMPT, VOCAB], [7], "invalid_token_ids"),
        ([-1, *PROMPT], [7], "invalid_token_ids"),
        (list(range(2047)), [7], None),
        (list(range(2048)), [7], "overlong_prompt"),
        (PROMPT, None, "invalid_token_ids"),
        (PROMPT, [], "invalid_first_token"),
        (PROMPT, [7, 8], "invalid_first_token"),
        (PROMPT, [VOCAB], "invalid_token_ids"),
        (PROMPT, [-5], "invalid_token_ids"),
    ],
)
def test_crafted_prompt_and_first_token_are_row_errors_of_their_kind(model, prompt, first, kind):
    """The prefill dataset's token columns; its payload column is above, and its other columns
    are the job's (id, error, finish_reason) or rewritten by decode (num_input_tokens)."""
    error = check_prefilled(prompt, first, VOCAB, model.max_model_len)
    assert (error and error.split(":", 1)[0]) == kind, error
    if kind == "invalid_token_ids":
        column = PROMPT_TOKENS if first == [7] else GENERATED_TOKENS
        assert error.startswith(f"invalid_token_ids: {column} ")


def test_a_payload_of_another_family_or_geometry_is_refused(model):
    """Another family's cache, a window's tokens or recurrent state where the engine keeps other
    ones: what a payload says of itself is checked against the engine's family."""
    p = KVPayload.encode(_kv(model, TOKENS), model, "none")
    latent = dataclasses.replace(model.cache, family=Family.mla, kv_heads=1, head_dim=576)
    window = dataclasses.replace(model.cache, family=Family.sliding, window=TOKENS - 2)
    hybrid = dataclasses.replace(model.cache, family=Family.hybrid, state_layers=2, state_bytes_per_layer=64)
    for cache, said in [
        (latent, "KV payload holds a attention-family cache; the engine's is mla"),
        (window, "KV payload holds a attention-family cache; the engine's is sliding"),
        (
            dataclasses.replace(window, family=Family.attention),
            f"expected {model.cache.token_shape(TOKENS - 2)} from 2",
        ),
        (hybrid, "KV payload holds a attention-family cache; the engine's is hybrid"),
        # Recurrent state is as of the prompt's last token but one.
        (
            dataclasses.replace(hybrid, family=Family.attention),
            f"expected {model.cache.token_shape(TOKENS - 1)} from 0",
        ),
    ]:
        with pytest.raises(PayloadMismatch, match=re.escape(said)):
            p.check(dataclasses.replace(model, cache=cache), TOKENS)


def test_state_travels_after_the_kv_and_comes_back_apart(model, tmp_path):
    """A hybrid model's payload: its prompt's KV but the last token, then the state's bytes."""
    hybrid = dataclasses.replace(
        model, cache=dataclasses.replace(model.cache, family=Family.hybrid, state_layers=2, state_bytes_per_layer=96)
    )
    kv, state = _kv(hybrid, TOKENS - 1), np.arange(192, dtype=np.uint8)
    p = KVPayload.encode(kv, hybrid, "int8", state=state)
    assert (p.state_bytes, p.family, p.nbytes) == (192, "hybrid", p.data.size)
    (read,) = payload.from_column(_written(payload.to_column([p]), tmp_path))
    read.verify(hybrid, TOKENS)
    loaded, offset, got = read.upload(None).to_device(0)
    assert offset == 0 and np.array_equal(got.numpy(), state)
    assert torch.allclose(loaded, kv, atol=0.05)
    # Its leading block shared: named, not carried; the state still follows its own KV.
    whole = KVPayload.encode(kv, hybrid, "none", block_tokens=4, state=state)
    block = whole.data[: whole.block_nbytes]
    shared = KVPayload.of(
        whole.data[whole.block_nbytes :], whole.shape, hybrid, "none", 4, [b"a" * 32], [payload.checksum(block)]
    )
    shared.verify(hybrid, TOKENS)
    kv_back, _, state_back = shared.upload(None, [block]).to_device(0)
    assert torch.equal(kv_back, kv) and np.array_equal(state_back.numpy(), state)
    with pytest.raises(PayloadMismatch, match="kv_mismatch: KV payload carries 192 bytes of state"):
        read.check(
            dataclasses.replace(hybrid, cache=dataclasses.replace(hybrid.cache, state_bytes_per_layer=95)), TOKENS
        )
