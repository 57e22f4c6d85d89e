"""The input side of 'every row exactly once': shards are fixed row ranges numbered the same on
every run, reading a shard returns exactly its rows, bad ids are flagged per row, and a bad
input fails the job before any work."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.columns import ERROR, ROW
from pipeline.errors import JobError
from pipeline.source import SHARD, PromptSource
from tests.conftest import job_config


def source(path, *overrides: str, shard_rows: int = 4) -> PromptSource:
    cfg = job_config(f"input.path={path}", *overrides)
    return PromptSource(cfg.input, shard_rows, (cfg.input.prompt_column,))


@pytest.fixture
def two_files(tmp_path):
    """A directory of two files (7 and 5 rows) with small row groups, and the files a job writes
    beside its rows (an input may be a job's output, e.g. a prefill dataset)."""
    for name, first, rows in (("a.parquet", 0, 7), ("b.parquet", 7, 5)):
        table = pa.table({"id": [f"r{i}" for i in range(first, first + rows)], "prompt": [f"p{i}" for i in range(first, first + rows)]})
        pq.write_table(table, tmp_path / name, row_group_size=3)
    for name in ("_SUCCESS", "metrics.json", "report.md", "report.png"):
        (tmp_path / name).write_text("not rows")
    return tmp_path


def test_shards_cover_every_row_once_in_input_order(two_files):
    s = source(two_files, shard_rows=4)
    assert s.num_rows == 12
    assert [(sh.path.rsplit("/", 1)[-1], sh.start, sh.stop, sh.first_row) for sh in s.shards] == [
        ("a.parquet", 0, 4, 0), ("a.parquet", 4, 7, 4), ("b.parquet", 0, 4, 7), ("b.parquet", 4, 5, 11),
    ]  # fmt: skip
    table = s.reader(s.shards)(pa.table({SHARD: [sh.index for sh in s.shards]}))
    assert table.column("prompt").to_pylist() == [f"p{i}" for i in range(12)]
    assert table.column(ROW).to_pylist() == list(range(12))
    assert table.column(ERROR).null_count == 12


def test_shard_reads_rows_across_row_group_boundaries(two_files):
    s = source(two_files, shard_rows=5)  # row groups of 3: shard [5, 7) starts inside the second
    second = s.shards[1]
    assert (second.start, second.stop) == (5, 7)
    assert s.reader(s.shards).read(second).column("id").to_pylist() == ["r5", "r6"]


def test_same_input_same_shards_and_fingerprint(two_files):
    a, b = source(two_files), source(two_files)
    assert a.shards == b.shards and a.fingerprint() == b.fingerprint()
    pq.write_table(pa.table({"id": ["x"], "prompt": ["y"]}), two_files / "c.parquet")
    assert source(two_files).fingerprint() != a.fingerprint()


def test_input_without_ids_gets_row_numbers(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "in.parquet")
    s = source(tmp_path / "in.parquet")
    assert s.reader(s.shards).read(s.shards[0]).column("id").to_pylist() == [0, 1, 2]


def test_duplicate_and_null_ids_are_row_errors(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "a", None, "b", "a"], "prompt": list("uvwxyz")}), tmp_path / "in.parquet")
    s = source(tmp_path / "in.parquet", shard_rows=100)
    errors = s.reader(s.shards).read(s.shards[0]).column(ERROR).to_pylist()
    assert errors[:2] == [None, None]
    assert errors[2] == "duplicate_id: id a is also on row 0"
    assert errors[3] == "null_id: the id is null"
    assert errors[4] == "duplicate_id: id b is also on row 1" and errors[5].startswith("duplicate_id")
    kept = source(tmp_path / "in.parquet", "input.duplicate_ids=keep", shard_rows=100)
    assert kept.reader(kept.shards).read(kept.shards[0]).column(ERROR).to_pylist() == [None] * 3 + [errors[3]] + [None] * 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no files"),
        (lambda p: pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p), "has no rows"),
        (lambda p: p.write_bytes(b"not parquet at all"), "is not readable Parquet"),
        (lambda p: pq.write_table(pa.table({"text": ["a"]}), p), "no column 'prompt' (columns: text)"),
    ],
    ids=["missing", "empty-dir", "no-rows", "not-parquet", "no-prompt-column"],
)
def test_bad_input_is_a_job_error(tmp_path, make, message):
    path = tmp_path / "input"
    make(path)
    with pytest.raises(JobError, match="input") as error:
        source(path)
    assert message in str(error.value)


def test_files_with_different_schemas_are_refused(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": [[1, 2]]}), tmp_path / "b.parquet")
    with pytest.raises(JobError, match="different schema"):
        source(tmp_path)
