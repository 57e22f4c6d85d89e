"""The KV payload column: Arrow and Parquet round trips for every codec and cache dtype, reads
that do not copy, and refusal of payloads that are damaged or made for another engine."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.columns import KV_PAYLOAD
from pipeline.config import Codec
from pipeline.kv import payload
from pipeline.kv.payload import KVPayload, PayloadLost, PayloadMismatch


def _kv(model, tokens: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.layers, 2, tokens, model.kv_heads, model.head_dim, generator=g).to(dtype)


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
        (dataclasses.replace(good, fingerprint="0123456789abcdef"), 9, "kv_mismatch: KV payload is from model 0123456789abcdef"),
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
