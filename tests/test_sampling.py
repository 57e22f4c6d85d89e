"""Per-row sampling values: each key's bad values are refused naming the key, the job's seed
gives each row its own, and a per-row column must be a struct of sampling keys."""

import math
import re
from dataclasses import asdict

import pyarrow as pa
import pytest

from pipeline.columns import ROW
from pipeline.config import SamplingConfig
from pipeline.engine.sampling import KEYS, RowSampling, check, derived_seed
from pipeline.errors import JobError
from pipeline.job.validate import check_job
from tests.conftest import job_config

JOB = asdict(SamplingConfig())

BAD = {
    "max_tokens": (0, "max_tokens must be in [1, 2147483647], not 0"),
    "min_tokens": (-1, "min_tokens must be in [0, 2147483647], not -1"),
    "temperature": ("hot", "temperature must be a number"),
    "top_p": (0.0, "top_p must be in (0, 1], not 0"),
    "top_k": (-2, "top_k must be in [-1, 2147483647], not -2"),
    "min_p": (1.5, "min_p must be in [0, 1], not 1.5"),
    "seed": (1.5, "seed must be an integer"),
    "stop": ("END", "stop must be a list of strings"),
    "stop_token_ids": ([1, "2"], "stop_token_ids must be a list of token ids"),
    "ignore_eos": (1, "ignore_eos must be true or false"),
    "repetition_penalty": (0.0, "repetition_penalty must be in (0, inf], not 0"),
    "presence_penalty": (3.0, "presence_penalty must be in [-2, 2], not 3"),
    "frequency_penalty": (-2.5, "frequency_penalty must be in [-2, 2], not -2.5"),
    "json_schema": ('{"type": 5}', "json_schema is not a valid JSON schema"),
    "regex": ("[a-", "regex is not a regular expression"),
    "choice": ([], "choice must not be empty"),
    "logprobs": (21, "logprobs must be in [0, 20], not 21"),
    "n": (0, "n must be in [1, 128], not 0"),
    "lora": (["a"], "lora must be a LoRA adapter's name"),
}


def test_every_key_has_its_bad_values():
    assert set(BAD) == set(KEYS)


@pytest.mark.parametrize("key", list(BAD))
def test_a_bad_value_is_refused_naming_its_key(key):
    value, message = BAD[key]
    assert message in check({**JOB, key: value})


def _nested(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth - 1):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("temperature", math.inf, "temperature must be a finite number, not inf"),
        ("repetition_penalty", math.inf, "repetition_penalty must be a finite number, not inf"),
        ("top_p", math.nan, "top_p must be a finite number, not nan"),
        ("n", 129, "n must be in [1, 128], not 129"),
        ("max_tokens", 10**30, "max_tokens must be in [1, 2147483647], not 100000000000000000000..."),
        ("stop", ["."] * 65, "stop holds 65 strings; at most 64"),
        ("stop_token_ids", [2**40], "stop_token_ids must be a list of token ids in [0, 2147483647]"),
        ("regex", "a{4294967296}", "regex cannot be used (OverflowError: the repetition number is too large)"),
        ("regex", "(" * 5000 + ")" * 5000, "regex cannot be used (RecursionError"),
        ("json_schema", "[" * 5000 + "]" * 5000, "json_schema cannot be used (RecursionError"),
        ("json_schema", _nested(40), "json_schema nests objects and arrays more than 64 deep"),
        ("json_schema", " " * 70_000, "json_schema is 70000 characters long; at most 65536"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_unbounded_values_and_values_that_break_their_check_are_refused(key, value, message):
    """Each is its row's `invalid_sampling` (or, in sampling.*, exit 2), never an exception that
    fails a batch and, on every rerun, the job."""
    assert message in check({**JOB, key: value})


def test_a_hostile_value_in_the_jobs_sampling_is_a_refusal(tmp_path):
    with pytest.raises(JobError, match=re.escape("sampling.regex cannot be used (OverflowError")):
        check_job(job_config("sampling.regex='a{4294967296}'", "input.path=in", "output.path=out"))


def test_a_rows_sampling_that_is_not_valid_utf8_fails_that_row_alone():
    kind = pa.struct([("stop", pa.list_(pa.string()))])
    stops = pa.array([{"stop": [b"."]}, {"stop": [b"\xff"]}, None], pa.struct([("stop", pa.list_(pa.binary()))]))
    batch = pa.table({"sampling_params": stops.view(kind), ROW: pa.array([0, 1, 2], pa.int64())})
    values = RowSampling(SamplingConfig(), "sampling_params", ("stop",)).values(batch)
    assert values[0]["stop"] == ["."] and values[2] == JOB
    assert values[1].error("sampling_params") == (
        "invalid_utf8: sampling_params is not valid UTF-8 (invalid start byte at byte 0)"
    )


def test_good_values_and_what_only_their_combination_refuses():
    assert check(JOB) is None
    assert check({**JOB, "json_schema": {"type": "object"}, "logprobs": 0, "stop": ["\n"]}) is None
    assert check({**JOB, "min_tokens": 9, "max_tokens": 8}) == "min_tokens (9) must not exceed max_tokens (8)"
    assert check({**JOB, "regex": "a", "choice": ["a"]}) == "at most one of json_schema, regex, choice"
    assert "needs a temperature above 0" in check({**JOB, "n": 2})
    assert check({**JOB, "n": 2, "temperature": 0.5}) is None


def test_the_jobs_seed_gives_each_row_its_own_and_a_rows_own_wins():
    sampling = RowSampling(SamplingConfig(seed=7), "sampling_params", ("seed",))
    batch = pa.table(
        {
            ROW: pa.array([0, 1, 2], pa.int64()),
            "sampling_params": pa.array([None, {"seed": None}, {"seed": 99}], pa.struct([("seed", pa.int64())])),
        }
    )
    seeds = [v["seed"] for v in sampling.values(batch)]
    assert seeds == [derived_seed(7, 0), derived_seed(7, 1), 99]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert derived_seed(7, 1) == derived_seed(7, 1) != derived_seed(8, 1)
    unseeded = RowSampling(SamplingConfig(), "sampling_params")
    assert [v["seed"] for v in unseeded.values(batch.drop_columns(["sampling_params"]))] == [None] * 3


def test_the_per_row_column_must_be_a_struct_of_sampling_keys():
    job = SamplingConfig()
    assert RowSampling.of(job, "sampling_params", pa.schema([("prompt", pa.string())])).row_keys == ()
    found = RowSampling.of(job, "sampling_params", pa.schema([("sampling_params", pa.struct([("n", pa.int32())]))]))
    assert found.row_keys == ("n",) and found.many and not found.logprobs_column
    with pytest.raises(JobError, match="is string, not a struct of sampling keys"):
        RowSampling.of(job, "sampling_params", pa.schema([("sampling_params", pa.string())]))
    with pytest.raises(JobError, match="has fields temp; sampling keys are max_tokens"):
        RowSampling.of(job, "sampling_params", pa.schema([("sampling_params", pa.struct([("temp", pa.float32())]))]))
