"""kv.transport=storage: a payload's bytes go to a file and come back bit-exact through a
Parquet column that holds only the file's name; a missing file is a lost payload; a name that
could reach outside the storage root is refused before any file is touched; errors of the
storage that may pass are retried, and a file of the wrong size is never read."""

import dataclasses
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.columns import KV_PAYLOAD
from pipeline.config import OutputConfig
from pipeline.io.output import OutputTarget
from pipeline.job.run import payload_store, removes_files
from pipeline.kv import payload
from pipeline.kv.payload import KVPayload, PayloadLost, PayloadMismatch
from pipeline.kv.store import BACKOFF_S, RETRIES, PayloadStore
from tests.conftest import job_config

JOB = "0123456789abcdef"


@pytest.fixture
def store(tmp_path) -> PayloadStore:
    return PayloadStore(f"file://{tmp_path}/kv", JOB)


def _payload(model, codec="none") -> KVPayload:
    kv = torch.randn(model.cache.token_shape(7), generator=torch.Generator().manual_seed(0))
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
    [
        "../../etc/passwd",
        "/etc/passwd",
        "s3://other-bucket/x.kv",
        f"{JOB}/../../{'a' * 32}.kv",
        f"{JOB}/{'a' * 32}.kv/../../x",
        f"{JOB}/{'A' * 32}.kv",
        "",
    ],
)
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


def test_a_folders_blocks_go_only_once_no_payload_file_is_left_to_name_them(model, store, tmp_path):
    """A decode of part of a prefill dataset removes its rows' files (kv.keep_files=false) but
    leaves the shared blocks the rest still names; the decode that removes the last file takes
    the blocks too. A folder that holds a row's file (one that failed its checks) keeps them."""
    rows = [store.put(_payload(model)).file for _ in range(3)]
    store.put_block("a" * 80, np.zeros(8, np.uint8))
    other = PayloadStore(f"file://{tmp_path}/kv", "fedcba9876543210")
    kept = other.put(_payload(model)).file
    other.put_block("b" * 80, np.zeros(8, np.uint8))
    store.remove(rows[:1])  # part 0 decoded
    assert store.remove_spent_blocks([*rows[:1], kept]) == []
    assert (tmp_path / "kv" / JOB / "blocks").exists() and (tmp_path / "kv" / kept).exists()
    store.remove(rows[1:])  # the rest decoded
    assert store.remove_spent_blocks(rows) == [JOB] and not (tmp_path / "kv" / JOB).exists()
    assert (tmp_path / "kv" / "fedcba9876543210" / "blocks").exists()


def test_kv_files_are_kept_unless_a_job_made_them_or_is_told_to_remove_them():
    def removes(*overrides: str) -> bool:
        return removes_files(job_config(*overrides))

    assert removes() and not removes("kv.keep_files=true")  # a job that makes and decodes its own
    assert not removes("phase=prefill") and not removes("phase=prefill", "kv.keep_files=false")
    assert not removes("phase=decode") and removes("phase=decode", "kv.keep_files=false")


def test_two_jobs_alike_but_for_their_output_have_folders_of_their_own(tmp_path):
    cfg = job_config("kv.transport=storage", f"kv.storage_path={tmp_path}/kv")
    job = {"phase": "prefill", "input": {"digest": "abc"}}
    folders = {
        payload_store(cfg, job, OutputTarget(OutputConfig(path=str(tmp_path / out)), job)).job for out in ("a", "b")
    }
    again = payload_store(cfg, job, OutputTarget(OutputConfig(path=f"file://{tmp_path}/a"), job)).job
    assert len(folders) == 2 and again in folders


class FlakyFileSystem(LocalFileSystem):
    """The local filesystem under protocol flaky://, whose next calls of `size` and `cat_file`
    raise the errors queued in `faults`, one each (None: that call goes through), as a shared
    store does now and then."""

    protocol = "flaky"
    faults: list[OSError | None] = []
    calls: list[str] = []

    def size(self, path):
        return self._call("size", super().size, path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self._call("cat_file", super().cat_file, path, start, end, **kwargs)

    def _call(self, name, method, *args, **kwargs):
        self.calls.append(name)
        fault = self.faults.pop(0) if self.faults else None
        if fault:
            raise fault
        return method(*args, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture
def flaky(tmp_path, monkeypatch) -> PayloadStore:
    monkeypatch.setattr(FlakyFileSystem, "faults", [])
    monkeypatch.setattr(FlakyFileSystem, "calls", [])
    return PayloadStore(f"flaky://{tmp_path}/kv", JOB)


def _backoff(failures: int) -> float:
    return sum(BACKOFF_S * 2**i for i in range(failures))


@pytest.mark.parametrize("error", [OSError("503 Slow Down"), ConnectionResetError(), TimeoutError()])
def test_errors_that_may_pass_are_retried_with_growing_waits(model, flaky, error):
    sent = _payload(model)
    stored = flaky.put(sent)
    FlakyFileSystem.faults = [*[error] * RETRIES, None, *[error] * RETRIES]  # all but the last try
    started = time.perf_counter()
    fetched = flaky.fetch(stored)
    assert time.perf_counter() - started >= 2 * _backoff(RETRIES)
    assert FlakyFileSystem.calls == ["size"] * (RETRIES + 1) + ["cat_file"] * (RETRIES + 1)
    assert torch.equal(fetched.decode(model, 7), sent.decode(model, 7))


def test_errors_that_persist_lose_the_row(model, flaky):
    stored = flaky.put(_payload(model))
    FlakyFileSystem.faults = [OSError("503 Slow Down")] * (RETRIES + 1)
    with pytest.raises(PayloadLost, match=r"^kv_unreadable: KV payload file .* OSError\('503 Slow Down'\)"):
        flaky.fetch(stored)
    assert FlakyFileSystem.calls == ["size"] * (RETRIES + 1)


@pytest.mark.parametrize(
    "error, kind", [(PermissionError("403 Forbidden"), "kv_unreadable"), (FileNotFoundError(), "kv_missing")]
)
def test_errors_that_cannot_pass_are_not_retried(model, flaky, error, kind):
    stored = flaky.put(_payload(model))
    FlakyFileSystem.faults = [error]
    with pytest.raises(PayloadLost, match=f"^{kind}: "):
        flaky.fetch(stored)
    assert FlakyFileSystem.calls == ["size"]


@pytest.mark.parametrize("change", [-1, 1])
def test_a_file_of_another_size_than_its_shape_makes_is_corrupt_and_not_read(model, flaky, tmp_path, change):
    stored = flaky.put(_payload(model, "fp8"))
    path = tmp_path / "kv" / stored.file
    data = path.read_bytes()
    path.write_bytes(data[:-1] if change < 0 else data + b"\0")
    with pytest.raises(
        PayloadLost,
        match=f"^kv_corrupt: KV payload file .* has {len(data) + change} bytes; its shape and codec make {len(data)}",
    ):
        flaky.fetch(stored)
    assert FlakyFileSystem.calls == ["size"]
