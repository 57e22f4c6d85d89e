"""The output side of 'every row exactly once': a shard is committed whole, once, in input
order, whatever order and how many times its rows arrive; a rerun of the same job resumes, a
different job is refused, and nothing looks complete before _SUCCESS."""
import pyarrow as pa
import pytest

from pipeline.columns import ERROR, ROW
from pipeline.config import OutputConfig
from pipeline.errors import JobError
from pipeline.io import read_output
from pipeline.output import SUCCESS, OutputTarget, ShardCommitter, part_name
from pipeline.source import Shard

JOB = {"input": {"digest": "abc"}, "model": "m1", "sampling": {"max_tokens": 8}, "shard_rows": 3}
SHARDS = [Shard(0, "in.parquet", 0, 3, 0), Shard(1, "in.parquet", 3, 5, 3)]


def target(path, job=JOB, overwrite=False) -> OutputTarget:
    return OutputTarget(OutputConfig(path=str(path), overwrite=overwrite), job)


def rows(*numbers: int) -> pa.Table:
    return pa.table({ROW: pa.array(numbers, pa.int64()), "text": [f"t{n}" for n in numbers],
                     ERROR: pa.nulls(len(numbers), pa.string())})  # fmt: skip


def test_shard_commits_once_complete_in_input_order_without_duplicates(tmp_path):
    out = target(tmp_path / "out")
    assert out.prepare() == set()
    committer = ShardCommitter(out, SHARDS)
    assert committer.add(rows(4, 1)) == 0
    assert committer.add(rows(0, 3)) == 2  # shard 1 (rows 3, 4) is complete
    assert committer.add(rows(1)) == 0  # a redone batch: row 1 again
    assert not (tmp_path / "out" / part_name(0)).exists()
    assert committer.add(rows(2)) == 3
    committer.check_complete()
    table = read_output(str(tmp_path / "out"))
    assert table.column("text").to_pylist() == ["t0", "t1", "t2", "t3", "t4"]
    assert ROW not in table.column_names


def test_incomplete_shards_fail_the_job(tmp_path):
    out = target(tmp_path / "out")
    out.prepare()
    committer = ShardCommitter(out, SHARDS)
    committer.add(rows(0, 1, 2, 3))
    with pytest.raises(JobError, match=r"shards \[1\]"):
        committer.check_complete()


def test_rerun_of_the_same_job_resumes_after_committed_shards(tmp_path):
    out = target(tmp_path / "out")
    out.prepare()
    out.commit(1, rows(3, 4).drop_columns([ROW]))
    (tmp_path / "out" / "_tmp.abc.part-000000.parquet").write_bytes(b"half written")
    assert target(tmp_path / "out").prepare() == {1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_kvrelay_job.json", part_name(1)]


def test_a_different_job_is_refused_naming_what_differs(tmp_path):
    target(tmp_path / "out").prepare()
    with pytest.raises(JobError, match=r"different job \(differs in: model, sampling\)"):
        target(tmp_path / "out", {**JOB, "model": "m2", "sampling": {"max_tokens": 9}}).prepare()
    assert target(tmp_path / "out", {**JOB, "model": "m2"}, overwrite=True).prepare() == set()


def test_foreign_data_is_refused_unless_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.csv").write_text("x")
    with pytest.raises(JobError, match="holds other data"):
        target(tmp_path / "out").prepare()
    target(tmp_path / "out", overwrite=True).prepare()
    assert not (tmp_path / "out" / "precious.csv").exists()


def test_success_marker_only_after_finish(tmp_path):
    out = target(tmp_path / "out")
    out.prepare()
    out.commit(0, rows(0).drop_columns([ROW]))
    assert not (tmp_path / "out" / SUCCESS).exists()
    out.finish({"rows_out": 1})
    assert (tmp_path / "out" / SUCCESS).exists() and (tmp_path / "out" / "metrics.json").exists()
    assert target(tmp_path / "out").prepare() == {0}  # a rerun starts by withdrawing the marker
    assert not (tmp_path / "out" / SUCCESS).exists()
