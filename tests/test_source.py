"""The input side of 'every row exactly once': shards are fixed row ranges numbered the same on
every run, reading a shard returns exactly its rows, bad ids are flagged per row, and a bad
input fails the job before any work."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.columns import ERROR, ROW
from pipeline.config import JobConfig
from pipeline.engine.model import resolve_model
from pipeline.errors import JobError
from pipeline.io.source import UNIT, PromptSource
from pipeline.job.run import identity
from tests.conftest import job_config


def source(path, *overrides: str, shard_rows: int = 4, reserved: tuple[str, ...] = ()) -> PromptSource:
    cfg = job_config(f"input.path={path}", *overrides)
    return PromptSource(cfg.input, shard_rows, (cfg.input.prompt_column,), reserved)


def read(s: PromptSource, shards=None) -> list[pa.Table]:
    """What the read tasks yield for `shards` (default all): one table per shard."""
    reader = s.reader(shards or s.shards)
    return list(reader(pa.table({UNIT: list(reader.units)})))


@pytest.fixture
def two_files(tmp_path):
    """A directory of two files (7 and 5 rows) with small row groups, and the files a job writes
    beside its rows (an input may be a job's output, e.g. a prefill dataset)."""
    for name, first, rows in (("a.parquet", 0, 7), ("b.parquet", 7, 5)):
        table = pa.table(
            {
                "id": [f"r{i}" for i in range(first, first + rows)],
                "prompt": [f"p{i}" for i in range(first, first + rows)],
            }
        )
        pq.write_table(table, tmp_path / name, row_group_size=3)
    for name in ("_SUCCESS", "_metrics.json", "_report.md", "_report.png"):
        (tmp_path / name).write_text("not rows")
    return tmp_path


def test_shards_cover_every_row_once_in_input_order(two_files):
    s = source(two_files, shard_rows=4)
    assert s.num_rows == 12
    assert [(sh.path.rsplit("/", 1)[-1], sh.start, sh.stop, sh.first_row) for sh in s.shards] == [
        ("a.parquet", 0, 4, 0),
        ("a.parquet", 4, 7, 4),
        ("b.parquet", 0, 4, 7),
        ("b.parquet", 4, 5, 11),
    ]
    tables = read(s)
    assert [t.num_rows for t in tables] == [sh.num_rows for sh in s.shards]
    table = pa.concat_tables(tables)
    assert table.column("prompt").to_pylist() == [f"p{i}" for i in range(12)]
    assert table.column(ROW).to_pylist() == list(range(12))
    assert table.column(ERROR).null_count == 12


def test_shard_reads_rows_across_row_group_boundaries(two_files):
    s = source(two_files, shard_rows=5)  # row groups of 3: shard [5, 7) starts inside the second
    second = s.shards[1]
    assert (second.start, second.stop) == (5, 7)
    assert read(s, [second])[0].column("id").to_pylist() == ["r5", "r6"]


def test_same_input_same_shards_and_fingerprint(two_files):
    a, b = source(two_files), source(two_files)
    assert a.shards == b.shards and a.fingerprint() == b.fingerprint()
    pq.write_table(pa.table({"id": ["x"], "prompt": ["y"]}), two_files / "c.parquet")
    assert source(two_files).fingerprint() != a.fingerprint()


def test_a_file_rewritten_at_the_same_size_changes_the_fingerprint(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["aaaa", "bbbb"]}), path)
    before, size, mtime = source(path).fingerprint(), path.stat().st_size, path.stat().st_mtime_ns
    pq.write_table(pa.table({"prompt": ["cccc", "dddd"]}), path)
    os.utime(path, ns=(mtime, mtime))  # same size, same time: only the footer's statistics differ
    assert path.stat().st_size == size
    assert source(path).fingerprint() != before


def test_shards_in_one_row_group_are_read_by_one_task_decoding_it_once(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(100)]}), path)  # one row group
    s = source(path, shard_rows=10)
    units = s.units(s.shards)
    assert len(units) == 1 and units[0].groups == (0,) and len(units[0].shards) == 10
    resumed = s.units([sh for sh in s.shards if sh.index not in (0, 9)])
    assert len(resumed) == 1 and [sh.index for sh in resumed[0].shards] == list(range(1, 9))
    tables = read(s, resumed[0].shards)
    assert [t.column("prompt").to_pylist() for t in tables] == [
        [f"p{i}" for i in range(10 * k, 10 * k + 10)] for k in range(1, 9)
    ]


def test_shards_of_small_row_groups_split_into_units_at_group_bounds(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(12)]}), path, row_group_size=4)
    s = source(path, shard_rows=3)  # shards [0,3) [3,6) [6,9) [9,12) over groups [0,4) [4,8) [8,12)
    assert [(u.groups, [sh.index for sh in u.shards]) for u in s.units(s.shards)] == [((0, 1, 2), [0, 1, 2, 3])]
    s = source(path, shard_rows=4)
    assert [(u.groups, [sh.index for sh in u.shards]) for u in s.units(s.shards)] == [
        ((0,), [0]),
        ((1,), [1]),
        ((2,), [2]),
    ]


def test_sizes_are_estimated_from_decoded_rows(tmp_path):
    """Block sizes come from these: a dictionary-encoded column is small in the footer but
    full-size once read, and a row with a null prompt makes no KV."""
    path = tmp_path / "in.parquet"
    prompts = ["x" * 40 if i % 4 == 0 else None for i in range(2000)]
    pq.write_table(pa.table({"prompt": prompts, "text": ["y" * 2000] * 2000}), path)
    assert pq.read_metadata(path).row_group(0).total_byte_size < 100_000  # the repeated text, encoded once
    s = source(path)
    assert 2000 < s.bytes_per_row() < 2100
    prompt_bytes, share = s.prompt_bytes("prompt")
    assert 40 <= prompt_bytes < 50 and share == 0.25


def test_hidden_and_underscore_entries_at_any_depth_are_not_input(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "a.parquet")
    for junk in (".ipynb_checkpoints/a-checkpoint.parquet", "_tmp/b.parquet", "sub/_c.parquet", "sub/.d.parquet"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"prompt": ["junk"]}), tmp_path / junk)
    pq.write_table(pa.table({"prompt": ["b"]}), tmp_path / "sub" / "b.parquet")
    s = source(tmp_path)
    assert [f.path.removeprefix(str(tmp_path)) for f in s.files] == ["/a.parquet", "/sub/b.parquet"]


def test_input_columns_named_like_the_jobs_own_are_refused(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "error": ["x"], "__kvrelay_row": [1]}), tmp_path / "in.parquet")
    with pytest.raises(JobError, match="input column.s. error, __kvrelay_row would clash"):
        source(tmp_path / "in.parquet", reserved=("error", "finish_reason"))


def test_input_without_ids_gets_row_numbers(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "in.parquet")
    s = source(tmp_path / "in.parquet")
    assert read(s)[0].column("id").to_pylist() == [0, 1, 2]


def test_duplicate_and_null_ids_are_row_errors(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "a", None, "b", "a"], "prompt": list("uvwxyz")}), tmp_path / "in.parquet")
    s = source(tmp_path / "in.parquet", shard_rows=100)
    errors = read(s)[0].column(ERROR).to_pylist()
    assert errors[:2] == [None, None]
    assert errors[2] == "duplicate_id: id a is also on row 0"
    assert errors[3] == "null_id: the id is null"
    assert errors[4] == "duplicate_id: id b is also on row 1" and errors[5].startswith("duplicate_id")
    kept = source(tmp_path / "in.parquet", "input.duplicate_ids=keep", shard_rows=100)
    assert read(kept)[0].column(ERROR).to_pylist() == [None] * 3 + [errors[3]] + [None] * 2


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


@pytest.mark.parametrize(
    "override",
    [
        "model.dtype=bfloat16",
        "model.max_model_len=1024",
        "kv.on_load_failure=error",
        "kv.codec=fp8",
        "sampling.seed=3",
        "output.shard_rows=7",
        "input.apply_chat_template=false",
    ],
)
def test_every_setting_that_changes_the_output_is_in_the_job_identity(tmp_path, override):
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "in.parquet")
    base = job_config(f"input.path={tmp_path / 'in.parquet'}")
    changed = job_config(f"input.path={tmp_path / 'in.parquet'}", override)

    def make(cfg: JobConfig) -> dict:
        source = PromptSource(cfg.input, cfg.output.shard_rows, ("prompt",))
        return identity(cfg, source, resolve_model(cfg.model, cfg.engine))

    assert make(base) != make(changed)
