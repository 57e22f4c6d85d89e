"""The command line as a scheduler runs it: a subprocess, a Parquet file in, the whole output
contract out, and a one-line message with exit code 2 when the job cannot start."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import read_output

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "", None, "Name three primary colours."]


def generate(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.generate", *overrides], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cli_writes_the_whole_output_contract(tmp_path):
    source = tmp_path / "prompts.parquet"
    pq.write_table(
        pa.table({"prompt": PROMPTS, "topic": ["geo", "poem", "none", "none", "art"], "priority": [1, 2, 3, 4, 5]}),
        source,
    )
    out = tmp_path / "out"
    done = generate(f"input.path={source}", f"output.path=file://{out}", "sampling.max_tokens=8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(out) in done.stdout

    table = read_output(str(out))
    assert table.schema.field("generated_tokens").type == pa.list_(pa.int32())
    for column in ("id", "generated_text", "num_input_tokens", "num_generated_tokens", "finish_reason", "error", "topic", "priority"):
        assert column in table.column_names
    rows = {r["priority"]: r for r in table.to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 5] and len({r["id"] for r in rows.values()}) == 5
    assert rows[3]["error"] == "prompt is empty" and rows[4]["error"] == "prompt is null, not text"
    for good, topic in ((1, "geo"), (2, "poem"), (5, "art")):
        row = rows[good]
        assert row["error"] is None and row["topic"] == topic
        assert row["num_generated_tokens"] == len(row["generated_tokens"]) > 0 and row["generated_text"]
        assert row["finish_reason"] in ("stop", "length") and row["num_input_tokens"] > 0
    assert "Paris" in rows[1]["generated_text"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["rows_in"], metrics["rows_out"], metrics["rows_errored"]) == (5, 5, 2)
    assert metrics["output_tokens"] == sum(r["num_generated_tokens"] for r in rows.values())
    assert metrics["input_tokens"] == sum(r["num_input_tokens"] for r in rows.values())
    assert metrics["kv_bytes_per_prompt_token"] == 46_080 and metrics["output_tokens_per_second"] > 0
    assert set(metrics["stages"]) == {"tokenize", "prefill", "decode", "detokenize"}
    assert all(s["busy_seconds"] > 0 for s in metrics["stages"].values())
    assert (out / "_SUCCESS").exists()


def test_missing_input_fails_with_one_line_and_exit_code_2(tmp_path):
    done = generate(f"input.path={tmp_path}/nothing.parquet", f"output.path={tmp_path}/out", timeout=120)
    assert done.returncode == 2
    assert "input.path" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_bad_override_fails_before_any_work(tmp_path):
    done = generate("input.path=x", "output.path=y", "sampling.max_tokens=lots", timeout=120)
    assert done.returncode != 0 and "max_tokens" in done.stderr
    assert "Started a local Ray instance" not in done.stderr
