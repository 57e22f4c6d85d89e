"""OpenAI Batch API output (output.format=openai_batch): the committed rows as the lines of
OpenAI's two result files, beside the Parquet parts,

    _batch_output.jsonl  requests that completed: {id, custom_id, response: {status_code: 200,
                         request_id, body: <chat.completion or text_completion>}, error: null}
    _batch_errors.jsonl  requests that failed: the same, with status 400 (the request) or 500
                         (the KV handoff) and body {error: {message, type, param, code}}

in input order. They are written from the committed parts once every shard is in, each aside
and then moved into place: every request once, whatever a crashed run left, and a rerun that
resumes writes them again. The parts stay: they are the job's commit log."""

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any, Iterator

import pyarrow.parquet as pq

from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    FINISH_REASON,
    GENERATED_TEXT,
    ID,
    LOGPROBS,
    NUM_GENERATED_TOKENS,
    NUM_INPUT_TOKENS,
    ErrorKind,
)
from pipeline.io.openai_requests import CHAT, MODEL, URL
from pipeline.io.output import OutputTarget
from pipeline.io.storage import BATCH_ERRORS, BATCH_OUTPUT, aside

COLUMNS = (ID, GENERATED_TEXT, NUM_INPUT_TOKENS, NUM_GENERATED_TOKENS, FINISH_REASON, ERROR, ERROR_KIND)
# Row errors of the KV handoff are the server's; every other is the request's.
SERVER_ERRORS = {ErrorKind.kv_corrupt, ErrorKind.kv_missing, ErrorKind.kv_unreadable, ErrorKind.kv_unsafe_path}


@dataclass(frozen=True)
class ResultFormat:
    # chat.completion objects, else text_completion, where a row does not carry its request's url
    chat: bool
    model: str  # where a row does not carry its request's body.model
    created: int  # unix seconds, for every completion of the job
    job: str  # the job's digest: request ids differ between jobs
    tokenizer: Any = None  # for logprobs: a token's text

    def token(self, token_id: int) -> str:
        return _token_text(self.tokenizer, token_id)


@lru_cache(maxsize=1 << 16)
def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def write_results(output: OutputTarget, shards: list[int], form: ResultFormat) -> tuple[int, int]:
    """Writes both files from the parts of `shards`; returns the lines of each."""
    fs, written = output.fs, {name: aside(f"{output.root}/{name}") for name in (BATCH_OUTPUT, BATCH_ERRORS)}
    counts = {BATCH_OUTPUT: 0, BATCH_ERRORS: 0}
    with fs.open(written[BATCH_OUTPUT], "w") as completed, fs.open(written[BATCH_ERRORS], "w") as failed:
        for number, row in enumerate(_rows(output, shards)):
            name = BATCH_ERRORS if row[ERROR] is not None else BATCH_OUTPUT
            (failed if name == BATCH_ERRORS else completed).write(json.dumps(result_line(row, number, form)) + "\n")
            counts[name] += 1
    for name, path in written.items():
        fs.mv(path, f"{output.root}/{name}")
    return counts[BATCH_OUTPUT], counts[BATCH_ERRORS]


def _rows(output: OutputTarget, shards: list[int]) -> Iterator[dict]:
    for shard in sorted(shards):
        part = pq.ParquetFile(output.part(shard), filesystem=output.arrow_fs)
        columns = [c for c in (*COLUMNS, LOGPROBS, MODEL, URL) if c in part.schema_arrow.names]
        for batch in part.iter_batches(columns=columns):
            yield from batch.to_pylist()


def result_line(row: dict, number: int, form: ResultFormat) -> dict:
    """One request's line: its completion, or its error."""
    request_id = hashlib.sha256(f"{form.job}/{number}".encode()).hexdigest()[:24]
    if row[ERROR] is None:
        response = {"status_code": 200, "request_id": request_id, "body": completion(row, request_id, form)}
    else:
        server = row[ERROR_KIND] in {k.value for k in SERVER_ERRORS}
        error = {
            "message": row[ERROR],
            "type": "server_error" if server else "invalid_request_error",
            "param": None,
            "code": row[ERROR_KIND],
        }
        response = {"status_code": 500 if server else 400, "request_id": request_id, "body": {"error": error}}
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": None if row[ID] is None else str(row[ID]),
        "response": response,
        "error": None,
    }


def completion(row: dict, request_id: str, form: ResultFormat) -> dict:
    """The chat.completion (or text_completion) object, with one choice per completion."""
    chat = row[URL] == CHAT if row.get(URL) else form.chat
    many = isinstance(row[GENERATED_TEXT], list)  # n completions: each column holds a list of n

    def each(key: str) -> list:
        return row[key] if many else [row[key]]

    texts, reasons, counts = each(GENERATED_TEXT), each(FINISH_REASON), each(NUM_GENERATED_TOKENS)
    logprobs = each(LOGPROBS) if row.get(LOGPROBS) is not None else [None] * len(texts)
    choices = [
        _chat_choice(i, text, reason, lp, form) if chat else _text_choice(i, text, reason, lp, form)
        for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs))
    ]
    completion_tokens = sum(counts)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": form.created,
        "model": row.get(MODEL) or form.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": row[NUM_INPUT_TOKENS],
            "completion_tokens": completion_tokens,
            "total_tokens": row[NUM_INPUT_TOKENS] + completion_tokens,
        },
        "system_fingerprint": None,
    }


def _chat_choice(index: int, text: str, reason: str, logprobs: list | None, form: ResultFormat) -> dict:
    content = None
    if logprobs is not None:
        content = {"content": [_chat_logprob(t, form) for t in logprobs], "refusal": None}
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": content,
        "finish_reason": reason,
    }


def _chat_logprob(token: dict, form: ResultFormat) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = form.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        **entry(token["token_id"], token["logprob"]),
        "top_logprobs": [entry(t["token_id"], t["logprob"]) for t in token["top"]],
    }


def _text_choice(index: int, text: str, reason: str, logprobs: list | None, form: ResultFormat) -> dict:
    content = None
    if logprobs is not None:
        tokens = [form.token(t["token_id"]) for t in logprobs]
        offsets = list(accumulate(map(len, tokens[:-1]), initial=0)) if tokens else []
        content = {
            "tokens": tokens,
            "token_logprobs": [t["logprob"] for t in logprobs],
            "top_logprobs": [{form.token(a["token_id"]): a["logprob"] for a in t["top"]} for t in logprobs],
            "text_offset": offsets,
        }
    return {"index": index, "text": text, "logprobs": content, "finish_reason": reason}
