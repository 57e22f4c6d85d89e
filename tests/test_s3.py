"""The README's `s3://` promise, on a local S3 (moto's server): Ray's workers reach the bucket
from a plain URL. Whole jobs on S3: tests/test_pipeline.py (a job, KV files included) and
tests/test_cli.py (a job killed and rerun)."""

import fsspec
import ray

from tests.s3 import Bucket


def test_ray_workers_reach_the_bucket_from_a_plain_url(s3: Bucket, ray_cluster):
    """A fresh worker process opens `s3://...` with nothing but its environment."""
    with fsspec.open(f"{s3.url}/hello.txt", "w") as f:
        f.write("hello")
    read = ray.remote(lambda url: fsspec.open(url).open().read().decode())
    assert ray.get(read.remote(f"{s3.url}/hello.txt")) == "hello"
