"""kv.transport=storage: a payload's bytes go to a file and come back bit-exact through a
Parquet column that holds only the file's name; a missing file is a lost payload; a name that
could reach outside the storage root is refused before any file is touched."""
import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.columns import KV_PAYLOAD
from pipeline.kv import payload
from pipeline.kv.payload import KVPayload, PayloadLost, PayloadMismatch
from pipeline.kv.transport import PayloadStore

JOB = "0123456789abcdef"


@pytest.fixture
def store(tmp_path) -> PayloadStore:
    return PayloadStore(f"file://{tmp_path}/kv", JOB)


def _payload(model, codec="none") -> KVPayload:
    kv = torch.randn(model.layers, 2, 7, model.kv_heads, model.head_dim, generator=torch.Generator().manual_seed(0))
    return KVPayload.encode(kv, model, codec)


@pytest.mark.parametrize("codec", ["none", "fp8", "int8"])
def test_payload_round_trips_through_a_file_and_parquet(model, store, tmp_path, codec):
    sent = _payload(model, codec)
    stored = store.put(sent)
    assert stored.file.startswith(f"{JOB}/") and stored.data.nbytes == 0 and stored.checksum == sent.checksum
    pq.write_table(pa.table({KV_PAYLOAD: payload.to_column([stored, None])}), tmp_path / "prefilled.parquet")
    got, missing = payload.from_column(pq.read_table(tmp_path / "prefilled.parquet"))
    assert missing is None
    fetched = store.fetch(got)
    assert torch.equal(fetched.decode(model, 7), sent.decode(model, 7))
    store.remove([got.file, None])
    with pytest.raises(PayloadLost, match="^kv_missing: KV payload file .* is missing"):
        store.fetch(got)


def test_damaged_file_fails_the_checksum(model, store, tmp_path):
    stored = store.put(_payload(model))
    path = tmp_path / "kv" / stored.file
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PayloadLost, match="^kv_corrupt"):
        store.fetch(stored).decode(model, 7)


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/etc/passwd", "s3://other-bucket/x.kv", f"{JOB}/../../{'a' * 32}.kv",
     f"{JOB}/{'a' * 32}.kv/../../x", f"{JOB}/{'A' * 32}.kv", ""],
)  # fmt: skip
def test_names_that_could_leave_the_storage_root_are_refused(model, store, name):
    planted = dataclasses.replace(_payload(model), file=name)
    with pytest.raises(PayloadMismatch, match="^kv_unsafe_path"):
        store.fetch(planted)
    if name:  # an empty name names no file: nothing to remove
        with pytest.raises(PayloadMismatch, match="^kv_unsafe_path"):
            store.remove([name])


def test_remove_job_takes_the_whole_folder(model, store, tmp_path):
    for _ in range(3):
        store.put(_payload(model))
    other = PayloadStore(f"file://{tmp_path}/kv", "fedcba9876543210")
    kept = other.put(_payload(model))
    store.remove_job()
    assert not (tmp_path / "kv" / JOB).exists()
    assert (tmp_path / "kv" / kept.file).exists()
