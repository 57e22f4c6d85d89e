"""The command line as a scheduler runs it: a subprocess, Parquet in a bucket, the whole output
contract out through a crash, and a one-line message with its exit code when the job cannot
start (2) or fails while running (3)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from ray.data import ActorPoolStrategy

from pipeline.errors import JobUnfinished
from pipeline.io.lease import OutputLease
from pipeline.io.output import OutputTarget
from pipeline.io.storage import read_output
from pipeline.job.cli import cause
from tests.conftest import job_config
from tests.s3 import Bucket

REPO = Path(__file__).resolve().parents[1]
GOOD = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Translate to English: 東京は日本の首都です 🚀",
    "What is 2 + 2?",
    "Give a synonym for happy.",
    "Which planet is the largest?",
    "What colour is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "Spell the word cat backwards.",
]
BAD = [  # prompt, id, error kind
    ("", "bad-empty", "empty_prompt"),
    (None, "bad-null", "null_prompt"),
    (b"\xc3\x28 broken", "bad-utf8", "invalid_utf8"),
    ("word " * 3000, "bad-overlong", "overlong_prompt"),
    ("Another question?", "g0", "duplicate_id"),
    ("A row without an id.", None, "null_id"),
]
SHARDS = 5  # 18 rows, 4 per shard


def generate(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.generate", *overrides], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _prompts() -> pa.Table:
    prompts = [p.encode() for p in GOOD] + [p.encode() if isinstance(p, str) else p for p, _, _ in BAD]
    ids = [f"g{i}" for i in range(len(GOOD))] + [i for _, i, _ in BAD]
    return pa.table(
        {
            "id": ids,
            "prompt": pa.array(prompts, pa.binary()).view(pa.string()),  # Parquet keeps invalid UTF-8 as it is
            "topic": [f"t{i}" for i in range(len(ids))],
            "priority": list(range(len(ids))),
        }
    )


@pytest.mark.slow
def test_cli_on_s3_after_a_crash_resumes_and_writes_every_row_exactly_once(s3: Bucket, tmp_path):
    """The job, its input and output in a bucket, is killed (driver, Ray and workers) once a part
    is committed; the same command then finishes it without rewriting that part. The output
    holds every input row once: completions for the good prompts, a per-row error for each bad
    one."""
    root, fs = f"{s3.url}/crash", s3.fs()
    source, out = f"{root}/prompts/prompts.parquet", f"{root}/out"
    with fsspec.open(source, "wb") as f:
        pq.write_table(_prompts(), f)
    command = [
        sys.executable,
        "-m",
        "jobs.generate",
        f"input.path={root}/prompts",
        f"output.path={out}",
        "mode=colocated",
        "sampling.max_tokens=8",
        "output.shard_rows=4",
        *(f"pools.{p}.batch_size=4" for p in ("tokenize", "colocated", "detokenize")),
    ]
    crashed = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not s3.parts(out):
        assert crashed.poll() is None, "the job ended before committing a shard"
        time.sleep(0.2)
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait()
    committed = s3.parts(out)
    assert not fs.exists(f"{out}/_SUCCESS")

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out in done.stdout
    parts = s3.parts(out)
    assert (
        set(parts) == {f"part-{i:06d}.parquet" for i in range(SHARDS)} and {p: parts[p] for p in committed} == committed
    )
    assert fs.exists(f"{out}/_SUCCESS")
    metrics = json.loads(fs.cat(f"{out}/_metrics.json"))
    assert metrics["shards"]["total"] == SHARDS and len(committed) <= metrics["shards"]["resumed"] <= SHARDS

    table = read_output(out)
    assert table.schema.field("generated_tokens").type == pa.list_(pa.int32())
    for column in (
        "id",
        "generated_text",
        "num_input_tokens",
        "num_generated_tokens",
        "finish_reason",
        "error",
        "error_kind",
        "topic",
        "priority",
    ):
        assert column in table.column_names
    rows = table.drop_columns(["prompt"]).to_pylist()  # carried as it came, invalid UTF-8 included
    assert [r["priority"] for r in rows] == list(range(len(rows))) == list(range(18))  # each row once, in input order
    for row in rows[: len(GOOD)]:
        assert row["error"] is None and row["error_kind"] is None and row["topic"] == f"t{row['priority']}"
        assert row["num_generated_tokens"] == len(row["generated_tokens"]) > 0 and row["generated_text"]
        assert row["finish_reason"] in ("stop", "length") and row["num_input_tokens"] > 0
    assert "Paris" in rows[0]["generated_text"]
    for row, (_, row_id, kind) in zip(rows[len(GOOD) :], BAD):
        assert row["id"] == row_id
        assert row["error"].startswith(f"{kind}: ") and row["error_kind"] == kind and row["generated_tokens"] is None

    # The counts cover the parts committed before the kill as well as those written after it.
    assert (metrics["rows_in"], metrics["rows_out"], metrics["rows_errored"]) == (18, 18, len(BAD))
    assert metrics["errors"] == {kind: 1 for _, _, kind in BAD}
    assert metrics["output_tokens"] == sum(r["num_generated_tokens"] for r in rows)
    assert metrics["input_tokens"] == sum(r["num_input_tokens"] for r in rows)
    assert metrics["output_tokens_per_second"] > 0

    other = generate(f"input.path={root}/prompts", f"output.path={out}", "sampling.max_tokens=9", timeout=120)
    assert other.returncode == 2 and "different job (differs in: sampling" in other.stderr


@pytest.mark.slow  # a subprocess that imports the pipeline: seconds each
def test_missing_input_fails_with_one_line_and_exit_code_2(tmp_path):
    done = generate(f"input.path={tmp_path}/nothing.parquet", f"output.path={tmp_path}/out", timeout=120)
    assert done.returncode == 2
    assert "input.path" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.slow  # a subprocess that imports the pipeline: seconds each
def test_bad_override_fails_before_any_work(tmp_path):
    done = generate("input.path=x", "output.path=y", "sampling.max_tokens=lots", timeout=120)
    assert done.returncode != 0 and "max_tokens" in done.stderr
    assert "Started a local Ray instance" not in done.stderr


@pytest.mark.slow
def test_a_job_that_fails_while_running_exits_3_with_its_cause_and_log(tmp_path):
    """An engine that cannot start (a context longer than the model's), its worker out of restarts."""
    pq.write_table(pa.table({"prompt": ["What is 2 + 2?"]}), tmp_path / "in.parquet")
    done = generate(
        f"input.path={tmp_path}/in.parquet",
        f"output.path={tmp_path}/out",
        "mode=colocated",
        "model.max_model_len=100000",
        "pools.colocated.max_restarts=0",
        timeout=600,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("kvrelay: failed: ")]
    assert "max_model_len (100000) is greater than" in line
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def _fail_in_a_task(batch):
    raise pa.ArrowNotImplementedError("Function 'binary_join_element_wise' has no kernel matching input types")


class _FailInAnActor:
    def __call__(self, batch):
        raise OverflowError("the repetition number is too large")


@pytest.mark.parametrize(
    "fn, options, line",
    [
        (
            _fail_in_a_task,
            {},
            "pyarrow.lib.ArrowNotImplementedError: Function 'binary_join_element_wise' has no kernel matching input types",
        ),
        (_FailInAnActor, {"compute": ActorPoolStrategy(size=1)}, "OverflowError: the repetition number is too large"),
    ],
    ids=["task", "actor"],
)
def test_the_one_line_cause_names_the_root_error_not_rays_wrapper(ray_cluster, fn, options, line):
    with pytest.raises(Exception) as failed:
        ray.data.range(2).map_batches(fn, batch_format="pyarrow", **options).materialize()
    assert cause(failed.value) == line


def test_a_local_error_is_named_with_its_message():
    assert cause(JobUnfinished("the output holds 5 rows of the input's 6; rerun to finish")) == (
        "JobUnfinished: the output holds 5 rows of the input's 6; rerun to finish"
    )


@pytest.mark.slow  # a subprocess that imports the pipeline and starts Ray
def test_a_run_that_a_rerun_gets_past_exits_3(tmp_path):
    """Another run holds the output: nothing to fix in the command, run it again later."""
    pq.write_table(pa.table({"prompt": ["What is 2 + 2?"]}), tmp_path / "in.parquet")
    overrides = (f"input.path={tmp_path}/in.parquet", f"output.path={tmp_path}/out", "mode=colocated")
    cfg = job_config(*overrides)
    output = OutputTarget(cfg.output, {})
    lease = OutputLease(output.fs, output.root, output.url).acquire()  # a live run of this process
    try:
        done = generate(*overrides, timeout=300)
    finally:
        lease.release()
    assert done.returncode == 3, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("kvrelay: failed: ")]
    assert line.startswith("kvrelay: failed: JobUnfinished: output.path") and "is in use by another run" in line
