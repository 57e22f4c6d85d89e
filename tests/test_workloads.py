"""Real workloads on the real engine: conversations with a system prompt, per-row sampling (max
tokens, stop strings, seeds, structured output, logprobs) and the per-row errors of bad values,
run colocated (a job through the Python API), as split prefill and decode jobs (KV in files), and
disaggregated inside a Ray Data pipeline of the caller's (`pipeline.api.process`):
token-identical, greedy and seeded alike."""

import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from transformers import AutoTokenizer

from pipeline.api import compose, process, run_job
from pipeline.columns import INTERNAL, KV_PAYLOAD
from pipeline.io.storage import read_output

pytestmark = pytest.mark.slow

# Long enough to span whole KV blocks (kv.shared_block_tokens): the rows that take it share them.
SYSTEM = (
    "You answer briefly. "
    + " ".join(
        f"Rule {n}: answer in plain words and never in lists or tables."
        for n in ("one", "two", "three", "four", "five", "six")
    )
    + " "
    + " ".join(
        f"Note {n}: the reader is busy and wants the point first."
        for n in ("one", "two", "three", "four", "five", "six")
    )
)
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
SAMPLING = pa.struct(
    [
        ("max_tokens", pa.int32()),
        ("temperature", pa.float32()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
        ("json_schema", pa.string()),
        ("regex", pa.string()),
        ("choice", pa.list_(pa.string())),
        ("logprobs", pa.int32()),
    ]
)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# id -> (messages, the row's sampling values)
ROWS = {
    "plain": (user("What is the capital of France?"), {}),
    "own_system": ([{"role": "system", "content": "Reply in French."}, *user("Say hello.")], {}),
    "short": (user("Count from one to ten."), {"max_tokens": 3}),
    "stop": (user("Write three sentences about the sea."), {"stop": ["."], "max_tokens": 40}),
    "json": (user("Describe a person."), {"json_schema": json.dumps(PERSON), "max_tokens": 40}),
    "regex": (user("Pick a number."), {"regex": "[0-9]{3}"}),
    "choice": (user("Is water wet?"), {"choice": ["yes", "no"]}),
    "logprobs": (user("Name a fruit."), {"logprobs": 2}),
    "seeded": (user("Tell me a story."), {"temperature": 1.0, "seed": 7}),
    "twin_a": (user("Invent a word."), {"temperature": 1.0}),
    "twin_b": (user("Invent a word."), {"temperature": 1.0}),
    "bad_temperature": (user("Hello."), {"temperature": -1.0}),
    "bad_schema": (user("Hello."), {"json_schema": "{"}),
    "bad_role": ([{"role": "robot", "content": "Beep."}], {}),
}
ERRORS = {
    "bad_temperature": ("invalid_sampling", "temperature must be in [0, inf], not -1"),
    "bad_schema": ("invalid_sampling", "json_schema is not JSON text or a mapping"),
    "bad_role": ("invalid_messages", "turn 0 has role 'robot'"),
}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    path = tmp_path_factory.mktemp("workload") / "conversations.parquet"
    table = pa.table(
        {
            "id": list(ROWS),
            "messages": pa.array([m for m, _ in ROWS.values()], pa.list_(TURN)),
            "sampling_params": pa.array(
                [{f.name: v.get(f.name) for f in SAMPLING} for _, v in ROWS.values()], SAMPLING
            ),
        }
    )
    pq.write_table(table, path)
    return path


def _config(*overrides: str):
    return compose(
        "input.messages_column=messages",
        f"input.system_prompt='{SYSTEM}'",
        "sampling.max_tokens=16",
        "sampling.seed=1234",
        *overrides,
    )


@pytest.fixture(scope="module")
def colocated(ray_cluster, workload, tmp_path_factory):
    out = tmp_path_factory.mktemp("colocated")
    metrics = run_job(_config("mode=colocated", f"input.path={workload}", f"output.path={out}"))
    assert metrics.rows_out == len(ROWS) and metrics.rows_errored == len(ERRORS)
    return {r["id"]: r for r in read_output(str(out)).to_pylist()}


@pytest.fixture(scope="module")
def split(ray_cluster, workload, tmp_path_factory):
    """A prefill job writes a prefill dataset with its KV in files (kv.transport=storage), in
    two parts; a decode job, run later from that dataset alone, loads them and leaves them as
    they are (a prefill dataset may be decoded again: the n=3 decode job below)."""
    prefilled, out, storage = (tmp_path_factory.mktemp(name) for name in ("prefilled", "decoded", "kv"))
    prefill = run_job(
        _config(
            "phase=prefill",
            f"input.path={workload}",
            f"output.path={prefilled}",
            "kv.transport=storage",
            f"kv.storage_path={storage}",
            f"output.shard_rows={len(ROWS) // 2}",
        )
    )
    assert set(prefill.stages) == {"tokenize", "prefill"}
    dataset = read_output(str(prefilled))
    assert dataset.num_rows == len(ROWS) and KV_PAYLOAD in dataset.column_names
    files = sorted(storage.glob("*/*.kv"))
    assert len(files) == len(ROWS) - len(ERRORS)  # a row refused before the engine has none
    # The system prompt's whole blocks, stored once for the rows that share it.
    blocks = sorted(storage.glob("*/blocks/*.kv"))
    sharing = [i for i, (messages, _) in ROWS.items() if i not in ERRORS and messages[0]["role"] != "system"]
    assert len(blocks) == prefill.kv_blocks_stored == 2 and prefill.kv_blocks_referenced == 2 * len(sharing)
    decoded = run_job(
        _config(
            "phase=decode",
            f"input.path={prefilled}",
            f"output.path={out}",
            f"kv.storage_path={storage}",
        )
    )
    assert set(decoded.stages) == {"decode", "detokenize"}
    assert decoded.kv_bytes_moved == prefill.kv_bytes_moved > 0 and all(f.exists() for f in files + blocks)
    return prefilled, storage, files + blocks, decoded, {r["id"]: r for r in read_output(str(out)).to_pylist()}


COMPARED = ("generated_tokens", "generated_text", "finish_reason", "error", "error_kind", "logprobs")


def _same(a: object, b: object) -> bool:
    """Equal, floats (logprobs) within 1e-4: the engines compute a prompt's last tokens in other
    passes (colocated: in a chunk after its prefix-cache hit; disaggregated: the last token alone,
    after the loaded KV), whose sums the CPU kernels order differently. Tokens are exact."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_split_jobs_generate_what_one_engine_does_greedy_and_seeded(colocated, split):
    split = split[-1]
    assert list(split) == list(colocated) == list(ROWS)
    for key in COMPARED:
        assert _same({i: r[key] for i, r in split.items()}, {i: r[key] for i, r in colocated.items()}), key
    assert colocated["seeded"]["finish_reason"] and colocated["seeded"]["generated_tokens"]
    # One global seed, two rows' own seeds: duplicate prompts sample differently.
    assert colocated["twin_a"]["generated_tokens"] != colocated["twin_b"]["generated_tokens"]


def test_each_rows_constraints_hold(colocated, model):
    rows = colocated
    assert all(rows[i]["error"] is None for i in ROWS if i not in ERRORS)
    assert rows["short"]["num_generated_tokens"] == 3 and rows["short"]["finish_reason"] == "length"
    assert rows["plain"]["num_generated_tokens"] <= 16
    assert "." not in rows["stop"]["generated_text"] and rows["stop"]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(rows["json"]["generated_text"]), PERSON)
    assert re.fullmatch("[0-9]{3}", rows["regex"]["generated_text"])
    assert rows["choice"]["generated_text"] in ("yes", "no")
    # The system prompt joins a conversation that has none, and only those.
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    for row_id, system in (("plain", SYSTEM), ("own_system", "Reply in French.")):
        turns = [{"role": "system", "content": system}, *[t for t in ROWS[row_id][0] if t["role"] != "system"]]
        rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        assert rows[row_id]["num_input_tokens"] == len(tokenizer(rendered, add_special_tokens=False).input_ids)


def test_logprobs_are_the_chosen_tokens_and_their_top_alternatives(colocated):
    row = colocated["logprobs"]
    assert [p["token_id"] for p in row["logprobs"]] == row["generated_tokens"]
    for p in row["logprobs"]:
        assert len(p["top"]) == 2 and p["top"][0]["logprob"] >= p["top"][1]["logprob"]
        # Greedy: the chosen token is the most likely one.
        assert p["top"][0] == {"token_id": p["token_id"], "logprob": p["logprob"]} and p["logprob"] <= 0
    assert all(r["logprobs"] is None for i, r in colocated.items() if i != "logprobs")


def test_bad_values_are_their_rows_errors(colocated):
    for row_id, (kind, detail) in ERRORS.items():
        row = colocated[row_id]
        assert row["error_kind"] == kind and detail in row["error"] and row["generated_tokens"] is None, row


def test_process_runs_the_stages_in_a_ray_data_pipeline_of_ones_own(ray_cluster, workload, colocated):
    """A Dataset in, a Dataset of completions out, disaggregated: what the colocated job wrote,
    with the input's columns carried and nothing internal."""
    # The last row goes: the others keep their numbers, and so the seeds sampling.seed gives them.
    prompts = ray.data.read_parquet(str(workload)).filter(lambda row: row["id"] != "bad_role")
    completions = process(prompts, _config("mode=disaggregated"))
    rows = {r["id"]: r for r in pa.concat_tables(ray.get(completions.to_arrow_refs())).to_pylist()}
    assert set(rows) == set(ROWS) - {"bad_role"}
    assert not any(c.startswith(INTERNAL) for c in next(iter(rows.values())))
    for key in (*COMPARED, "messages", "num_input_tokens"):
        assert _same({i: r[key] for i, r in rows.items()}, {i: colocated[i][key] for i in rows}), key


def test_n_completions_come_from_one_payload(ray_cluster, workload, split, tmp_path):
    """The prefill dataset decoded again, with sampling.n=3 (and a temperature for rows without
    their own), told to remove its KV files and to fail a row rather than recompute it: every
    row's KV is still there (the first decode kept it) and moves once for its three samples,
    which one engine draws alike,
    sample i is seeded seed + i (so a row with its own seed and temperature gets its n=1
    completion first), structured output holds for every finished sample, and every completion
    column holds a list of three."""
    prefilled, storage, files, one, rows = split
    out, three_samples = tmp_path / "three", ("sampling.n=3", "sampling.temperature=1.0")
    decode = ("phase=decode", f"input.path={prefilled}", f"output.path={out}", f"kv.storage_path={storage}")
    removing = ("kv.keep_files=false", "kv.on_load_failure=error")
    three = run_job(_config(*decode, *three_samples, *removing))
    assert three.kv_bytes_moved == one.kv_bytes_moved > 0 and three.kv_recomputed_rows == 0
    assert three.rows_errored == len(ERRORS)
    # The payload files go once their rows are committed, the shared blocks once no file is left.
    assert not any(f.exists() for f in files)
    got = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    colocated = process(ray.data.read_parquet(str(workload)), _config("mode=colocated", *three_samples))
    alike = pa.concat_tables(ray.get(colocated.to_arrow_refs())).to_pylist()
    assert {r["id"]: r["generated_tokens"] for r in alike} == {i: r["generated_tokens"] for i, r in got.items()}
    for row_id, row in rows.items():
        if row["error"]:
            assert got[row_id]["generated_tokens"] is None and got[row_id]["error"] == row["error"]
            continue
        samples = got[row_id]["generated_tokens"]
        assert len(samples) == len(got[row_id]["generated_text"]) == len(got[row_id]["finish_reason"]) == 3
        assert got[row_id]["num_generated_tokens"] == [len(s) for s in samples]
    for row_id in ("seeded", "twin_a", "twin_b"):
        assert got[row_id]["generated_tokens"][0] == rows[row_id]["generated_tokens"], row_id
        assert len({tuple(s) for s in got[row_id]["generated_tokens"]}) == 3
    for text, finish in zip(got["json"]["generated_text"], got["json"]["finish_reason"]):
        if finish == "stop":  # max_tokens may cut a sample short
            jsonschema.validate(json.loads(text), PERSON)
    assert all(text in ("yes", "no") for text in got["choice"]["generated_text"])
    assert three.output_tokens == sum(sum(r["num_generated_tokens"] or []) for r in got.values())
