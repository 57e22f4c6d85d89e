"""OpenAI Batch files in and out: requests written as OpenAI's documentation writes them are read
as rows (a malformed line is its row's error, its kind named), and the results are written as
OpenAI's, checked with the openai package's types. End to end: a disaggregated job, a colocated
rerun that resumes it after a crash, and split prefill and decode jobs, each request once, in
input order, token-identical across the three."""

import gzip
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from pipeline.api import run_job
from pipeline.bench.advise import take_rows
from pipeline.config import InputConfig, InputFormat
from pipeline.io.openai_requests import CHAT, COMPLETIONS, Served, parse
from pipeline.io.openai_results import ResultFormat, result_line
from pipeline.io.source import PromptSource
from pipeline.io.storage import BATCH_ERRORS, BATCH_OUTPUT
from tests.conftest import job_config

MODEL = "smollm2-135m"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def request(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}}


def chat(text: str, **sampling) -> dict:
    return {"messages": [{"role": "user", "content": text}], **sampling}


# As OpenAI's Batch guide writes them; then lines each wrong in one way.
LINES = [
    request(
        "capital",
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            "max_tokens": 16,
        },
    ),
    request(
        "parts",
        {
            "messages": [
                {"role": "developer", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]},
            ],
            "max_completion_tokens": 8,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    request("seeded", chat("Invent a word.", n=2, temperature=0.8, seed=7, max_tokens=8)),
    request(
        "json",
        chat(
            "Describe a person.",
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            max_tokens=40,
        ),
    ),
    request("stop", chat("Write three sentences about the sea.", stop=".", max_tokens=40)),
    {**request("other_model", chat("Hello.")), "body": {"model": "gpt-4o-mini", **chat("Hello.")}},
    request("tools", chat("Hello.", tools=[{"type": "function", "function": {"name": "f"}}])),
    request("hot", chat("Hello.", temperature="hot")),
    request("image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    request("completion", {"prompt": "Hello"}, url=COMPLETIONS),
    "{not json",
    request("capital", chat("Again.")),
    request("cold", chat("Hello.", temperature=-1.0)),
]
ERRORS = {  # line -> (custom_id, error kind)
    5: ("other_model", "unknown_model"),
    6: ("tools", "invalid_request"),
    7: ("hot", "invalid_request"),
    8: ("image", "invalid_messages"),
    9: ("completion", "invalid_request"),
    10: (None, "invalid_request"),
    11: ("capital", "duplicate_id"),
    12: ("cold", "invalid_sampling"),  # found by the engine's checks, not the reader's
}
IDS = [line["custom_id"] if isinstance(line, dict) else None for line in LINES]


def write_jsonl(path: Path, lines: list) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def requests_dir(tmp_path_factory) -> Path:
    """The requests in two files, the second gzipped: one input, as a folder of batch files."""
    folder = tmp_path_factory.mktemp("requests")
    write_jsonl(folder / "a.jsonl", LINES[:6])
    write_jsonl(folder / "b.jsonl.gz", LINES[6:])
    return folder


def source_of(path: Path, shard_rows: int = 1000) -> PromptSource:
    cfg = InputConfig(path=str(path), format=InputFormat.openai_batch)
    return PromptSource(cfg, shard_rows, ("prompt",), served=Served(MODEL))


def test_requests_are_rows_and_bad_lines_their_rows_errors(requests_dir):
    source = source_of(requests_dir, shard_rows=5)
    assert source.num_rows == len(LINES) and [s.num_rows for s in source.shards] == [5, 1, 5, 2]
    assert source.cfg.messages_column == "messages" and source.cfg.apply_chat_template
    errors = {row: error for shard in source.shards for row, error in shard.errors}
    assert {row: error.split(":")[0] for row, error in errors.items()} == {
        line: kind for line, (_, kind) in ERRORS.items() if kind != "invalid_sampling"
    }
    assert "body.tools is not supported" in errors[6] and "body.temperature is str" in errors[7]
    assert "image_url parts" in errors[8] and "'{not json'" in errors[10]
    rows = {row["id"]: row for row in _rows(source)[:6]}
    assert rows["parts"]["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a fruit."},
    ]
    sampling = {i: row["sampling_params"] for i, row in rows.items()}
    assert sampling["parts"]["max_tokens"] == 8 and sampling["parts"]["logprobs"] == 2
    assert json.loads(sampling["json"]["json_schema"]) == PERSON and sampling["stop"]["stop"] == ["."]
    assert rows["seeded"]["sampling_params"]["n"] == 2 and rows["seeded"]["url"] == CHAT


def _rows(source: PromptSource) -> list[dict]:
    reader = source.reader(source.shards)
    return [row for unit in reader.units.values() for table in reader.read_requests(unit) for row in table.to_pylist()]


def test_a_completions_batch_reads_text_prompts_without_the_chat_template(tmp_path):
    path = write_jsonl(
        tmp_path / "completions.jsonl",
        [request("a", {"prompt": "Once upon a time", "logprobs": 3}, url=COMPLETIONS), request("b", chat("Hi."))],
    )
    source = source_of(path)
    assert source.cfg.messages_column is None and not source.cfg.apply_chat_template
    assert source.cfg.source_column == "prompt" and source.schema.field("prompt").type == "string"
    rows = _rows(source)
    assert rows[0]["prompt"] == "Once upon a time" and rows[0]["sampling_params"]["logprobs"] == 3
    assert source.shards[0].errors == (
        (1, "invalid_request: url '/v1/chat/completions'; this batch's requests go to /v1/completions"),
    )


class Tokens:
    """A tokenizer stand-in for logprobs' token text: token i is "t<i>"."""

    def decode(self, ids: list[int]) -> str:
        return f"t{ids[0]}"


FORM = ResultFormat(chat=True, model=MODEL, created=1, job="job", tokenizer=Tokens())
LOGPROBS = [
    {"token_id": 5, "logprob": -0.1, "top": [{"token_id": 5, "logprob": -0.1}, {"token_id": 6, "logprob": -2.0}]}
]
DONE = {
    "id": "a",
    "generated_text": ["yes", "no"],
    "num_input_tokens": 7,
    "num_generated_tokens": [1, 1],
    "finish_reason": ["stop", "length"],
    "logprobs": [LOGPROBS, LOGPROBS],
    "error": None,
    "error_kind": None,
}


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS])
def test_a_result_line_is_openais_with_a_choice_per_completion(url):
    line = result_line({**DONE, "url": url}, 0, FORM)
    assert line["custom_id"] == "a" and line["error"] is None and line["response"]["status_code"] == 200
    body = line["response"]["body"]
    parsed = (ChatCompletion if url == CHAT else Completion).model_validate(body)
    assert parsed.usage.prompt_tokens == 7 and parsed.usage.total_tokens == 9 and len(parsed.choices) == 2
    if url == CHAT:
        assert parsed.choices[1].message.content == "no" and parsed.choices[1].finish_reason == "length"
        assert [t.token for t in parsed.choices[0].logprobs.content[0].top_logprobs] == ["t5", "t6"]
    else:
        assert parsed.choices[0].text == "yes" and parsed.choices[0].logprobs.top_logprobs == [{"t5": -0.1, "t6": -2.0}]


def test_a_failed_request_is_a_400_and_a_lost_payload_a_500():
    failed = {**DONE, "error": "unknown_model: body.model 'x'", "error_kind": "unknown_model"}
    lost = {**DONE, "error": "kv_corrupt: KV payload fails its checksum", "error_kind": "kv_corrupt"}
    request_error, server_error = (result_line(row, 0, FORM)["response"] for row in (failed, lost))
    assert request_error["status_code"] == 400 and request_error["body"]["error"] == {
        "message": "unknown_model: body.model 'x'",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_model",
    }
    assert server_error["status_code"] == 500 and server_error["body"]["error"]["type"] == "server_error"


def read_results(out: Path) -> tuple[list[dict], list[dict]]:
    return tuple(
        [json.loads(line) for line in (out / name).read_text().splitlines()] for name in (BATCH_OUTPUT, BATCH_ERRORS)
    )


def batch_job(*overrides: str):
    return job_config("input.format=openai_batch", "output.format=openai_batch", "sampling.max_tokens=16", *overrides)


def without_created(lines: list[dict]) -> list[dict]:
    for line in lines:
        line["response"]["body"].pop("created", None)
    return lines


def answers(lines: list[dict]) -> list[tuple]:
    """What a request was answered, whichever job answered it."""
    bodies = [line["response"]["body"] for line in lines]
    return [(line["custom_id"], b.get("choices"), b.get("usage"), b.get("error")) for line, b in zip(lines, bodies)]


@pytest.fixture(scope="module")
def disaggregated(ray_cluster, requests_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disaggregated")
    metrics = run_job(
        batch_job("mode=disaggregated", f"input.path={requests_dir}", f"output.path={out}", "output.shard_rows=5")
    )
    assert metrics.rows_out == len(LINES) and metrics.rows_errored == len(ERRORS)
    return out


@pytest.mark.slow
def test_each_request_is_answered_once_in_input_order_as_openai_writes_it(disaggregated, requests_dir, tmp_path):
    completed, failed = read_results(disaggregated)
    assert [line["custom_id"] for line in completed] == [IDS[i] for i in range(len(LINES)) if i not in ERRORS]
    assert [(line["custom_id"], line["response"]["body"]["error"]["code"]) for line in failed] == list(ERRORS.values())
    bodies = {line["custom_id"]: ChatCompletion.model_validate(line["response"]["body"]) for line in completed}
    assert "Paris" in bodies["capital"].choices[0].message.content
    assert len(bodies["seeded"].choices) == 2
    jsonschema.validate(json.loads(bodies["json"].choices[0].message.content), PERSON)
    assert "." not in bodies["stop"].choices[0].message.content and bodies["stop"].choices[0].finish_reason == "stop"
    top = bodies["parts"].choices[0].logprobs.content
    assert len(top) == bodies["parts"].usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in top)
    assert len({line["id"] for line in completed + failed}) == len(LINES)

    # A crash after the first shard, before the results: a colocated rerun redoes the rest and
    # writes the same results (the split is token-identical), each request once.
    resumed = tmp_path / "resumed"
    shutil.copytree(disaggregated, resumed)
    for name in ("part-000001.parquet", "part-000002.parquet", "_SUCCESS", BATCH_OUTPUT, BATCH_ERRORS):
        (resumed / name).unlink()
    metrics = run_job(
        batch_job("mode=colocated", f"input.path={requests_dir}", f"output.path={resumed}", "output.shard_rows=5")
    )
    assert metrics.shards.resumed == 2 and metrics.rows_out == len(LINES)
    assert [without_created(lines) for lines in read_results(resumed)] == [
        without_created(lines) for lines in read_results(disaggregated)
    ]


@pytest.mark.slow
def test_split_jobs_on_a_batch_file_answer_what_the_disaggregated_job_does(disaggregated, requests_dir, tmp_path):
    prefilled, decoded = tmp_path / "prefilled", tmp_path / "decoded"
    run_job(
        batch_job("phase=prefill", f"input.path={requests_dir}", f"output.path={prefilled}", "output.format=parquet")
    )
    # The prefill dataset carries each request's id, model and url: the decode job needs no more.
    run_job(
        job_config("phase=decode", f"input.path={prefilled}", f"output.path={decoded}", "output.format=openai_batch")
    )
    assert [answers(lines) for lines in read_results(decoded)] == [
        answers(lines) for lines in read_results(disaggregated)
    ]


def test_advise_samples_a_batch_file_as_the_rows_a_job_reads(requests_dir):
    rows = take_rows(source_of(requests_dir), np.array([0, 7, 12]))
    assert rows.column("id").to_pylist() == ["capital", "hot", "cold"]
    assert rows.column("messages")[2].as_py() == [{"role": "user", "content": "Hello."}]


def test_a_body_naming_a_lora_adapter_runs_under_it():
    served = Served(MODEL, frozenset({"support"}))
    lines = [
        json.dumps(request(str(i), chat("Hi.")) | {"body": {"model": m, **chat("Hi.")}})
        for i, m in enumerate((MODEL, "support", "legal"))
    ]
    requests = parse(lines, CHAT, served)
    assert [row["sampling_params"]["lora"] for row in requests.table.to_pylist()[:2]] == [None, "support"]
    assert requests.errors == {2: "unknown_model: body.model 'legal'; this job serves smollm2-135m, support"}
