"""Per-row sampling values: each key's bad values are refused naming the key, the job's seed
gives each row its own, and a per-row column must be a struct of sampling keys."""

from dataclasses import asdict

import pyarrow as pa
import pytest

from pipeline.columns import ROW
from pipeline.config import SamplingConfig
from pipeline.engine.sampling import KEYS, RowSampling, check, derived_seed
from pipeline.errors import JobError

JOB = asdict(SamplingConfig())

BAD = {
    "max_tokens": (0, "max_tokens must be in [1, inf], not 0"),
    "min_tokens": (-1, "min_tokens must be in [0, inf], not -1"),
    "temperature": ("hot", "temperature must be a number"),
    "top_p": (0.0, "top_p must be in (0, 1], not 0"),
    "top_k": (-2, "top_k must be in [-1, inf], not -2"),
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
    "n": (0, "n must be in [1, inf], not 0"),
}


def test_every_key_has_its_bad_values():
    assert set(BAD) == set(KEYS)


@pytest.mark.parametrize("key", list(BAD))
def test_a_bad_value_is_refused_naming_its_key(key):
    value, message = BAD[key]
    assert message in check({**JOB, key: value})


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
