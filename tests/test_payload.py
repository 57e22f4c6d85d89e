"""The KV payload column: Arrow and Parquet round trips, and refusal of payloads that do not fit."""
import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.kv import payload
from pipeline.kv.payload import KVPayload, PayloadMismatch


def _payloads(model, dtype, lengths):
    g = torch.Generator().manual_seed(0)
    return [
        KVPayload(torch.randn(model.layers, 2, n, model.kv_heads, model.head_dim, generator=g).to(dtype), model.fingerprint)
        if n else None
        for n in lengths
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_payload_round_trips_through_parquet(model, dtype, tmp_path):
    model = dataclasses.replace(model, dtype=dtype)
    sent = _payloads(model, getattr(torch, dtype), [5, 0, 128, 1])
    pq.write_table(pa.table(payload.to_columns(sent, model)), tmp_path / "kv.parquet")
    got = payload.from_columns(pq.read_table(tmp_path / "kv.parquet"))
    assert got[1] is None
    for a, b in zip(sent, got):
        if a:
            assert b.kv.dtype == a.kv.dtype and torch.equal(a.kv, b.kv) and b.fingerprint == a.fingerprint


def test_payload_from_another_model_is_refused(model):
    (kv,) = _payloads(model, torch.float32, [9])
    with pytest.raises(PayloadMismatch, match="from model"):
        dataclasses.replace(kv, fingerprint="0123456789abcdef").check(model, 9)


def test_payload_of_wrong_length_or_dtype_is_refused(model):
    (kv,) = _payloads(model, torch.float32, [9])
    kv.check(model, 9)
    with pytest.raises(PayloadMismatch, match="shape"):
        kv.check(model, 10)
    with pytest.raises(PayloadMismatch, match="dtype"):
        KVPayload(kv.kv.half(), kv.fingerprint).check(model, 9)
