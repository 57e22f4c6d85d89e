"""Shared fixtures: configs composed with Hydra as a user would, the bundled model resolved
once, a local S3 and one Ray cluster for the whole session."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from pipeline.api import compose
from pipeline.bench.config import register
from pipeline.bench.sample import write_sample
from pipeline.config import JobConfig
from pipeline.engine.model import ResolvedModel, resolve_model
from tests.s3 import Bucket, local_s3

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def job_config(*overrides: str) -> JobConfig:
    return compose("input.path=unset", "output.path=unset", *overrides)


@pytest.fixture(scope="session")
def model() -> ResolvedModel:
    cfg = job_config()
    return resolve_model(cfg.model, cfg.engine)


@pytest.fixture(scope="session")
def sample_prompts(tmp_path_factory) -> Path:
    """The bundled sample as `make sample` writes it; a clean clone has no data/."""
    path = tmp_path_factory.mktemp("sample") / "sample_prompts.parquet"
    write_sample(path, rows=320, seed=0)
    return path


@pytest.fixture(scope="session")
def s3() -> Iterator[Bucket]:
    with local_s3() as bucket:
        yield bucket


# After s3: Ray's workers inherit the environment that reaches its endpoint.
@pytest.fixture(scope="session")
def ray_cluster(s3):
    # Workers import test-defined stages (tests.*) from the repo root.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(CONF.parent)}})
    yield
    ray.shutdown()
