"""The README's `s3://` promise, on a local S3 (moto's server): whole jobs with their input,
output and KV payload files in a bucket write what the same job writes on local disk (a job
killed on S3 and rerun: tests/test_cli.py)."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.bench.sample import SENTENCES
from pipeline.io.storage import read_output
from pipeline.job.run import run
from tests.conftest import job_config
from tests.s3 import Bucket

PROMPTS = [f"Rewrite in fewer words: {s}" for s in SENTENCES[:16]]
SHARDS = 4
# Blocks and shards of 4: several of each on a few prompts.
JOB = [
    "mode=disaggregated",
    "kv.transport=storage",
    "sampling.max_tokens=8",
    "output.shard_rows=4",
    *(f"pools.{p}.batch_size=4" for p in ("tokenize", "prefill", "decode", "detokenize")),
]


# pipeline/job/graph.py hands WriteFragments output.fragments(), the protocol-stripped path
# ("bucket/out/_fragments"), as if it were a URL: on s3:// the workers write their fragments to
# local disk (bucket/out/_fragments/... under their working directory) and commit_shard, opening
# those local paths on S3, fails with FileNotFoundError (NoSuchBucket, the bucket being "tmp" etc.).
def _job(root: str) -> list[str]:
    """Writes the prompts under root (a directory of one file); the job's paths under it."""
    with fsspec.open(f"{root}/prompts/prompts.parquet", "wb") as f:
        pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS}), f)
    return [f"input.path={root}/prompts", f"output.path={root}/out", f"kv.storage_path={root}/kv", *JOB]


@pytest.fixture(scope="module")
def local_rows(ray_cluster, tmp_path_factory) -> list[dict]:
    """The same job on local disk: what S3 must not change."""
    root = str(tmp_path_factory.mktemp("local"))
    run(job_config(*_job(root)))
    return read_output(f"{root}/out").to_pylist()


def test_ray_workers_reach_the_bucket_from_a_plain_url(s3: Bucket, ray_cluster):
    """A fresh worker process opens `s3://...` with nothing but its environment."""
    with fsspec.open(f"{s3.url}/hello.txt", "w") as f:
        f.write("hello")
    read = ray.remote(lambda url: fsspec.open(url).open().read().decode())
    assert ray.get(read.remote(f"{s3.url}/hello.txt")) == "hello"


@pytest.mark.slow
def test_a_job_on_s3_writes_what_it_writes_on_local_disk(s3: Bucket, ray_cluster, local_rows):
    root = f"{s3.url}/whole"
    metrics = run(job_config(*_job(root)))
    assert read_output(f"{root}/out").to_pylist() == local_rows
    assert [r["id"] for r in local_rows] == [f"s{i}" for i in range(len(PROMPTS))]
    assert all(r["error"] is None and r["num_generated_tokens"] > 0 for r in local_rows)
    # Every payload went through the bucket and was found there: none was recomputed.
    assert metrics.kv_bytes_moved > 0 and metrics.kv_recomputed_rows == 0
    fs = s3.fs()
    assert set(s3.parts(f"{root}/out")) == {f"part-{i:06d}.parquet" for i in range(SHARDS)} and fs.exists(
        f"{root}/out/_SUCCESS"
    )
    assert json.loads(fs.cat(f"{root}/out/metrics.json"))["rows_out"] == len(PROMPTS)
    assert fs.find(f"{root}/kv") == []  # the payload files go once their rows are committed
