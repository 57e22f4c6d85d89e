"""A large input written the way pandas and pyarrow write by default (one row group) through the
real pipeline: every row group decoded once however many shards it holds, every row out once,
in input order, whether the job runs whole or resumes."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.output import part_name
from pipeline.io.storage import read_output
from pipeline.job.metrics import ShardCounts
from pipeline.job.run import run
from tests.conftest import job_config

pytestmark = pytest.mark.slow
ROWS, SHARD_ROWS = 3000, 200


@pytest.fixture(scope="module")
def one_row_group(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "in.parquet"
    prompts = ["What is 2 + 2?", "Name a yellow fruit."] + [None] * (ROWS - 2)  # the engine has two rows to do
    table = pa.table({"prompt": pa.array(prompts, pa.string()), "n": list(range(ROWS)), "text": ["x" * 512] * ROWS})
    pq.write_table(table, path, row_group_size=ROWS)
    assert pq.read_metadata(path).num_row_groups == 1
    return path


def test_one_row_group_is_decoded_once_and_every_row_comes_out_once(ray_cluster, one_row_group, tmp_path):
    out = tmp_path / "out"
    cfg = job_config(
        "mode=colocated",
        f"input.path={one_row_group}",
        f"output.path={out}",
        f"output.shard_rows={SHARD_ROWS}",
        "sampling.max_tokens=4",
    )
    metrics = run(cfg)
    assert metrics.rows_out == ROWS and metrics.input_rows_decoded <= 1.1 * ROWS
    assert metrics.errors == {"null_prompt": ROWS - 2} and metrics.late_duplicate_rows == 0
    assert read_output(str(out), ["n"]).column("n").to_pylist() == list(range(ROWS))

    for shard in (3, 7, 14):  # as if a crash had come before these shards committed
        (out / part_name(shard)).unlink()
    resumed = run(cfg)
    assert resumed.shards == ShardCounts(total=ROWS // SHARD_ROWS, resumed=ROWS // SHARD_ROWS - 3)
    assert resumed.rows_out == ROWS and resumed.input_rows_decoded <= ROWS  # one read task, the group once
    assert read_output(str(out), ["n"]).column("n").to_pylist() == list(range(ROWS))
