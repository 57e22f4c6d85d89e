"""The output side of 'every row exactly once': workers write fragments, a shard is committed
whole, once, in input order, whatever order and how many times its rows arrive; a rerun of the
same job resumes, a different job is refused, one run at a time holds the path, overwriting
removes only what kvrelay wrote, and nothing looks complete before _SUCCESS."""

import json
import os
import re
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.columns import ERROR, GENERATED_TOKENS, KV_FILE, NUM_INPUT_TOKENS, ROW
from pipeline.config import OutputConfig
from pipeline.errors import JobError, JobUnfinished
from pipeline.io import commit
from pipeline.io import lease as lease_module
from pipeline.io.commit import ShardLedger, commit_shard
from pipeline.io.lease import LEASE, OutputLease, process_space
from pipeline.io.output import FRAGMENTS, MANIFEST, SUCCESS, OutputTarget, ShardStats, part_name, read_stats
from pipeline.io.source import Shard
from pipeline.io.storage import read_output
from pipeline.job.run import run
from pipeline.kv.store import PayloadStore
from pipeline.stages.write import WriteFragments
from tests.conftest import job_config

JOB = {"input": {"digest": "abc"}, "model": "m1", "sampling": {"max_tokens": 8}, "shard_rows": 3}
SHARDS = [Shard(0, "in.parquet", 0, 3, 0), Shard(1, "in.parquet", 3, 5, 3)]


def target(path, job=JOB, overwrite=False) -> OutputTarget:
    return OutputTarget(OutputConfig(path=str(path), overwrite=overwrite), job)


def claimed(path, **kwargs) -> tuple[OutputTarget, set[int]]:
    """A target that has taken its directory, as a run does, and let go of it again."""
    out = target(path, **kwargs)
    out.inspect()
    lease, done = out.claim()
    lease.release()
    return out, done


def rows(*numbers: int, errors: tuple = ()) -> pa.Table:
    return pa.table(
        {
            ROW: pa.array(numbers, pa.int64()),
            "text": [f"t{n}" for n in numbers],
            ERROR: pa.array([f"empty_prompt: {n}" if n in errors else None for n in numbers], pa.string()),
            NUM_INPUT_TOKENS: pa.array([n + 1 for n in numbers], pa.int32()),
            GENERATED_TOKENS: pa.array([[n] * n for n in numbers], pa.list_(pa.int32())),
        }
    )


def ledger_of(out: OutputTarget, store=None) -> ShardLedger:
    """A ledger under a lease that no other run has taken."""
    return ShardLedger(out, SHARDS, store, OutputLease(out.fs, out.root, out.url))


def writer(out: OutputTarget, shards=SHARDS) -> WriteFragments:
    return WriteFragments(out.fragments(), np.array([s.first_row for s in shards]), np.array([s.index for s in shards]))


def test_shard_commits_once_complete_in_input_order_without_duplicates(tmp_path, ray_cluster):
    out, _ = claimed(tmp_path / "out")
    write, ledger = writer(out), ledger_of(out)
    ledger.add(write(rows(4, 1)))  # one fragment for each shard
    ledger.add(write(rows(0, 3)))  # shard 1 (rows 3, 4) is complete
    assert ledger.committed(wait=True) == 2
    ledger.add(write(rows(1)))  # a redone batch: row 1 again, before its shard commits
    assert not (tmp_path / "out" / part_name(0)).exists()
    ledger.add(write(rows(2, errors=(2,))))
    assert ledger.committed(wait=True) == 3 and ledger.missing() == []
    ledger.add(write(rows(3)))  # after its shard committed: dropped and counted
    assert ledger.late_duplicate_rows == 1
    table = read_output(str(tmp_path / "out"))
    assert table.column("text").to_pylist() == ["t0", "t1", "t2", "t3", "t4"]
    assert ROW not in table.column_names
    assert ledger.stats == ShardStats(
        rows=5, rows_errored=1, errors={"empty_prompt": 1}, input_tokens=15, output_tokens=10
    )
    assert read_stats(out.arrow_fs, out.part(1)) == ShardStats(rows=2, input_tokens=9, output_tokens=7)
    assert list((tmp_path / "out" / FRAGMENTS).rglob("*.arrow")) == []  # committed or dropped, none left


def test_shards_completed_together_commit_in_one_task(tmp_path, ray_cluster):
    out, _ = claimed(tmp_path / "out")
    ledger = ledger_of(out)
    ledger.add(writer(out)(rows(0, 1, 2, 3, 4)))  # one block over both shards: a fragment each
    assert len(ledger.committing) == 1
    assert ledger.committed(wait=True) == 5 and ledger.stats.rows == 5
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [part_name(0), part_name(1)]


def test_incomplete_shards_are_reported(tmp_path, ray_cluster):
    out, _ = claimed(tmp_path / "out")
    ledger = ledger_of(out)
    ledger.add(writer(out)(rows(0, 1, 2, 3)))
    ledger.committed(wait=True)
    assert ledger.missing() == [1]


def test_a_retried_commit_finds_its_part_and_only_clears_up(tmp_path):
    out, _ = claimed(tmp_path / "out")
    fragments = writer(out)(rows(0, 1, 2)).column("path").to_pylist()
    first = commit_shard(out.url, out.part(0), SHARDS[0], fragments, None)
    again = commit_shard(out.url, out.part(0), SHARDS[0], fragments, None)
    assert first == again and read_output(str(tmp_path / "out")).num_rows == 3


def test_payload_files_go_only_once_their_rows_part_is_written(tmp_path, monkeypatch):
    """A commit whose part fails to be written (a killed task, a full disk) leaves its rows'
    payload files where they are, for the retry; the commit that writes the part removes them."""
    out, _ = claimed(tmp_path / "out")
    store = PayloadStore(f"file://{tmp_path}/kv", "0" * 16)
    files = [f"{'0' * 16}/{n:032x}.kv" for n in range(3)]
    for name in files:
        (tmp_path / "kv" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "kv" / name).write_bytes(b"kv")
    decoded = rows(0, 1, 2).append_column(KV_FILE, pa.array(files))
    fragments = writer(out)(decoded).column("path").to_pylist()

    def killed(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(commit, "write_part", killed)
    with pytest.raises(OSError):
        commit_shard(out.url, out.part(0), SHARDS[0], fragments, store)
    assert all((tmp_path / "kv" / name).exists() for name in files)
    monkeypatch.undo()
    commit_shard(out.url, out.part(0), SHARDS[0], fragments, store)
    assert read_output(str(tmp_path / "out")).num_rows == 3
    assert not any((tmp_path / "kv" / name).exists() for name in files)


def test_rerun_of_the_same_job_resumes_after_committed_shards(tmp_path, ray_cluster):
    out, _ = claimed(tmp_path / "out")
    ledger = ledger_of(out)
    ledger.add(writer(out)(rows(3, 4, 0)))
    ledger.committed(wait=True)
    (tmp_path / "out" / "_tmp.abc.part-000000.parquet").write_bytes(b"half written")
    (tmp_path / "out" / "metrics.json").write_text("{}")  # as earlier versions named it
    rerun = target(tmp_path / "out")
    assert rerun.inspect() == {1} and rerun.resumed.rows == 2
    _, done = claimed(tmp_path / "out")
    assert done == {1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, part_name(1)]


def test_a_different_job_is_refused_naming_what_differs(tmp_path):
    claimed(tmp_path / "out")
    with pytest.raises(JobError, match=r"different job \(differs in: model, sampling\)"):
        target(tmp_path / "out", {**JOB, "model": "m2", "sampling": {"max_tokens": 9}}).inspect()
    assert target(tmp_path / "out", {**JOB, "model": "m2"}, overwrite=True).inspect() == set()


def test_foreign_data_is_refused_even_with_overwrite_and_left_untouched(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.csv").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(JobError, match="holds other data"):
            target(tmp_path / "out", overwrite=overwrite).inspect()
    assert (tmp_path / "out" / "precious.csv").read_text() == "x"


def test_overwrite_removes_only_what_kvrelay_wrote(tmp_path, ray_cluster):
    out, _ = claimed(tmp_path / "out")
    ledger = ledger_of(out)
    ledger.add(writer(out)(rows(0, 1, 2)))
    ledger.committed(wait=True)
    out.finish('{"rows_out": 3}')
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "_mine").mkdir()
    again, done = claimed(tmp_path / "out", job={**JOB, "model": "m2"}, overwrite=True)
    assert done == set()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["_mine", MANIFEST, "notes.txt"])
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["model"] == "m2"


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / "part-000001 (copy).parquet").write_bytes(b""),
            r"part-000001 \(copy\).parquet, which no kvrelay",
        ),
        (lambda d: (d / part_name(1)).write_bytes(b""), "is damaged"),
        (lambda d: pq.write_table(pa.table({"a": [1]}), d / part_name(1)), "not a part kvrelay committed"),
        (lambda d: (d / MANIFEST).write_text('{"input": {"dig'), f"damaged {MANIFEST}"),
    ],
    ids=["stray-copy", "zero-length-part", "foreign-part", "truncated-manifest"],
)
def test_a_damaged_output_is_refused_with_a_clear_message(tmp_path, damage, message):
    claimed(tmp_path / "out")
    damage(tmp_path / "out")
    with pytest.raises(JobError, match=message):
        target(tmp_path / "out").inspect()


def test_success_marker_only_after_finish(tmp_path):
    out, _ = claimed(tmp_path / "out")
    assert not (tmp_path / "out" / SUCCESS).exists()
    out.finish('{"rows_out": 1}')
    assert (tmp_path / "out" / SUCCESS).exists() and (tmp_path / "out" / "_metrics.json").exists()
    _, done = claimed(tmp_path / "out")  # a rerun starts by withdrawing the marker
    assert done == set() and not (tmp_path / "out" / SUCCESS).exists()


def test_one_run_at_a_time_holds_the_path(tmp_path):
    first = target(tmp_path / "out")
    first.inspect()
    lease, _ = first.claim()
    second = target(tmp_path / "out", overwrite=True)
    second.inspect()
    with pytest.raises(JobUnfinished, match=rf"in use by another run \(host {os.uname().nodename}, pid {os.getpid()}"):
        second.claim()
    assert (tmp_path / "out" / MANIFEST).exists()  # the refused overwrite removed nothing
    lease.release()
    assert not (tmp_path / "out" / LEASE).exists()
    claimed(tmp_path / "out", overwrite=True)


def test_a_crashed_runs_lease_is_taken_over(tmp_path):
    claimed(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"run": "x", "host": os.uname().nodename, "pid": int(dead.stdout), "process_space": process_space()}
    (tmp_path / "out" / LEASE).write_text(json.dumps(holder))  # killed here: its process is gone
    claimed(tmp_path / "out")
    _hold(tmp_path / "out", {**holder, "host": "elsewhere", "process_space": "elsewhere"}, written_ago=600)
    claimed(tmp_path / "out")  # on another host, silent for longer than the lease lasts


def _hold(out, holder: dict, written_ago: float = 0.0) -> None:
    """Another run's lease on `out`, written `written_ago` seconds ago by the storage's clock."""
    (out / LEASE).write_text(json.dumps(holder))
    os.utime(out / LEASE, (time.time() - written_ago,) * 2)


def test_expiry_is_judged_by_the_storages_clock_not_the_holders(tmp_path):
    """A holder whose clock runs an hour behind still holds the path while it refreshes; one
    whose clock runs ahead loses it once it stops."""
    claimed(tmp_path / "out")
    other = {"run": "x", "host": "elsewhere", "pid": 1, "process_space": "elsewhere"}
    _hold(tmp_path / "out", {**other, "heartbeat": time.time() - 3600}, written_ago=5)
    with pytest.raises(JobUnfinished, match="in use by another run"):
        claimed(tmp_path / "out")
    _hold(tmp_path / "out", {**other, "heartbeat": time.time() + 3600}, written_ago=120)
    claimed(tmp_path / "out")


def test_a_holder_of_the_same_host_name_in_another_pid_namespace_is_not_taken_for_gone(tmp_path):
    """Two containers may share a host name and pids: a pid that is not running here may be
    running there."""
    claimed(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"run": "x", "host": os.uname().nodename, "pid": int(dead.stdout), "process_space": "another container"}
    _hold(tmp_path / "out", holder)
    with pytest.raises(JobUnfinished, match="in use by another run"):
        claimed(tmp_path / "out")


def test_a_run_whose_lease_was_taken_stops_before_committing_more(tmp_path, ray_cluster):
    """Another run took the lease (it judged this one gone): at its next refresh this run finds
    the lease is not its own, leaves it as it is, and commits nothing more."""
    out = target(tmp_path / "out")
    out.inspect()
    lease, _ = out.claim()
    ledger = ShardLedger(out, SHARDS, None, lease)
    ledger.add(writer(out)(rows(0, 1, 2)))
    assert ledger.committed(wait=True) == 3
    taker = {"run": "y", "host": "elsewhere", "pid": 1, "process_space": "elsewhere"}
    _hold(tmp_path / "out", taker)
    lease.refresh()
    with pytest.raises(JobUnfinished, match=r"taken over by another run \(host elsewhere, pid 1\); this run stopped"):
        ledger.add(writer(out)(rows(3, 4)))
    assert not (tmp_path / "out" / part_name(1)).exists()
    lease.release()
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run"] == "y"


class FlakyWrites(LocalFileSystem):
    """The local filesystem under protocol flaky-writes://, whose writes fail while `failing`."""

    protocol = "flaky-writes"
    failing = 0

    def open(self, path, mode="rb", **kwargs):
        if "w" in mode and FlakyWrites.failing:
            FlakyWrites.failing -= 1
            raise ConnectionResetError("the store dropped the request")
        return super().open(path, mode, **kwargs)


fsspec.register_implementation("flaky-writes", FlakyWrites, clobber=True)


def test_a_refresh_that_fails_is_tried_again_and_the_lease_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(lease_module, "RETRY_S", 0.01)
    out = target(f"flaky-writes://{tmp_path}/out")
    out.inspect()
    lease, _ = out.claim()
    written = json.loads((tmp_path / "out" / LEASE).read_text())["heartbeat"]
    monkeypatch.setattr(FlakyWrites, "failing", 3)
    time.sleep(0.5)
    assert FlakyWrites.failing == 0 and json.loads((tmp_path / "out" / LEASE).read_text())["heartbeat"] > written
    lease.check()
    lease.release()


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        (
            lambda d: pq.write_table(pa.table({"prompt": ["a"], "error": ["x"]}), d / "in.parquet"),
            ["input.path={d}/in.parquet", "output.path={d}/out"],
            "input column(s) error would clash",
        ),
        (
            lambda d: (d / "in").mkdir() or pq.write_table(pa.table({"prompt": ["a"]}), d / "in" / "a.parquet"),
            ["input.path={d}/in", "output.path={d}/in/out"],
            "overlap",
        ),
        (
            lambda d: (d / "in").mkdir() or pq.write_table(pa.table({"prompt": ["a"]}), d / "in" / "a.parquet"),
            ["input.path={d}/in", "output.path={d}", "output.overwrite=true"],
            "overlap",
        ),
        (
            lambda d: pq.write_table(pa.table({"prompt": ["a"]}), d / "in.parquet"),
            ["input.path={d}/in.parquet", "output.path=memory://kvrelay/out"],
            "out of the workers' reach",
        ),
    ],
    ids=["reserved-column", "output-inside-input", "overwrite-around-input", "output-in-memory"],
)
def test_a_job_that_must_not_run_touches_nothing(tmp_path, setup, overrides, message):
    """Refused before any work (the command line makes a refusal exit 2: tests/test_cli.py)."""
    setup(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(JobError, match=re.escape(message)):
        run(job_config(*(o.format(d=tmp_path) for o in overrides)))
    assert sorted(p for p in tmp_path.rglob("*")) == before
