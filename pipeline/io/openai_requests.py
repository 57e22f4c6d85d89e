"""OpenAI Batch API input (input.format=openai_batch): JSONL files whose lines are requests,

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2-135m", "messages": [...], "max_tokens": 64, ...}}

read as rows of a prompt table: `custom_id` is the row's `id`, `body.messages` (chat) or
`body.prompt` (completions) its prompt, the body's sampling fields its `sampling_params`, and
its `model` and `url` are carried to the output (and through a prefill dataset), where the
results are written as OpenAI's (pipeline/io/openai_results.py).
One file may be `.jsonl` or `.jsonl.gz`, on any fsspec URL. A line that is not such a request is
that row's error, never the job's; so is a body naming a model the job does not serve. A body
naming one of the job's LoRA adapters runs under it. Fields a body leaves out take the job's
`sampling.*`."""

import json
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from pipeline.columns import ErrorKind, row_error
from pipeline.config import InputConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
# The prompt table's columns: named as a job reads them by default.
ID, MESSAGES, PROMPT, SAMPLING, MODEL, URL = "id", "messages", "prompt", "sampling_params", "model", "url"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
# Body field -> the sampling key it sets, with the Python types it may hold.
_NUMBER, _INTEGER = (int, float), (int,)
SAMPLING_FIELDS: dict[str, tuple[str, tuple[type, ...], pa.DataType]] = {
    "max_tokens": ("max_tokens", _INTEGER, pa.int64()),
    "max_completion_tokens": ("max_tokens", _INTEGER, pa.int64()),
    "temperature": ("temperature", _NUMBER, pa.float64()),
    "top_p": ("top_p", _NUMBER, pa.float64()),
    "seed": ("seed", _INTEGER, pa.int64()),
    "n": ("n", _INTEGER, pa.int64()),
    "presence_penalty": ("presence_penalty", _NUMBER, pa.float64()),
    "frequency_penalty": ("frequency_penalty", _NUMBER, pa.float64()),
}
SAMPLING_TYPE = pa.struct(
    [
        *{key: kind for key, _, kind in SAMPLING_FIELDS.values()}.items(),
        ("stop", pa.list_(pa.string())),
        ("logprobs", pa.int64()),
        ("json_schema", pa.string()),  # JSON text: a schema's keys vary row by row
        ("lora", pa.string()),
    ]
)
# Read elsewhere (model, prompt, messages) or in how they are read (stop, logprobs, response_format).
_READ = {"model", "messages", "prompt", "stop", "logprobs", "top_logprobs", "response_format"}
# Accepted and without effect on a completion: bookkeeping, and streaming (a batch has none).
_IGNORED = {"user", "store", "metadata", "service_tier", "stream", "stream_options"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Served:
    """What a request's body.model may name: the job's model, or one of its LoRA adapters, which
    the row then runs under."""

    model: str
    adapters: frozenset[str] = frozenset()

    def lora(self, name: object) -> str | None:
        """The adapter a body's model names (None: the model itself); a name neither is refused."""
        if name == self.model:
            return None
        if name in self.adapters:
            return str(name)
        served = ", ".join([self.model, *sorted(self.adapters)])
        raise RequestError(ErrorKind.unknown_model, f"body.model {name!r}; this job serves {served}")


class RequestError(ValueError):
    def __init__(self, kind: ErrorKind, detail: str):
        super().__init__(row_error(kind, detail))


@dataclass(frozen=True)
class Requests:
    """One file's requests as prompt-table rows, and the errors of the lines that are not
    requests the job can run (row in file -> error)."""

    table: pa.Table
    errors: dict[int, str]
    endpoint: str | None  # of the file's first request (None: no line is a request)


def schema(endpoint: str) -> pa.Schema:
    prompt = (MESSAGES, pa.list_(MESSAGE_TYPE)) if endpoint == CHAT else (PROMPT, pa.string())
    columns = [(ID, pa.string()), prompt, (SAMPLING, SAMPLING_TYPE), (MODEL, pa.string()), (URL, pa.string())]
    return pa.schema(columns)


def input_config(cfg: InputConfig, endpoint: str) -> InputConfig:
    """The prompt table's columns as a job reads them: conversations with the model's chat
    template for chat requests, text as it is for completions."""
    chat = endpoint == CHAT
    return replace(
        cfg,
        id_column=ID,
        prompt_column=PROMPT,
        messages_column=MESSAGES if chat else None,
        apply_chat_template=chat,
        sampling_column=SAMPLING,
    )


def first_endpoint(lines: list[str]) -> str | None:
    """The url of the first line that names one kvrelay serves: every request in a batch goes to
    one endpoint, as OpenAI's Batch API asks."""
    for line in lines:
        try:
            url = json.loads(line).get("url")
        except (ValueError, AttributeError):
            continue
        if url in ENDPOINTS:
            return url
    return None


def read_lines(fs, path: str) -> list[str]:
    """The file's non-blank lines (`.gz` is decompressed)."""
    with fs.open(path, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
        return [line for line in f if line.strip()]


def parse(lines: list[str], endpoint: str, served: Served) -> Requests:
    """The lines as rows for `endpoint`; a row whose line cannot run has nulls and an error."""
    rows, errors = [], {}
    for number, line in enumerate(lines):
        try:
            rows.append(_request(line, endpoint, served))
        except RequestError as error:
            errors[number] = str(error)
            rows.append({ID: _custom_id(line), URL: endpoint})
    table = pa.Table.from_pylist(rows, schema=schema(endpoint))
    return Requests(table, errors, endpoint)


def _custom_id(line: str) -> str | None:
    """A bad line's custom_id where it has one, so that its error row can be found by it."""
    try:
        found = json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _request(line: str, endpoint: str, served: Served) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError as error:
        raise RequestError(
            ErrorKind.invalid_request, f"the line is not JSON ({error}): {line.strip()[:80]!r}"
        ) from None
    if not isinstance(request, dict):
        raise RequestError(ErrorKind.invalid_request, "the line is not a JSON object")
    custom_id, body = request.get("custom_id"), request.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise RequestError(ErrorKind.invalid_request, "custom_id is missing or not a string")
    if request.get("method", "POST") != "POST":
        raise RequestError(ErrorKind.invalid_request, f"method {request.get('method')!r}; requests are POST")
    if request.get("url") != endpoint:
        raise RequestError(
            ErrorKind.invalid_request, f"url {request.get('url')!r}; this batch's requests go to {endpoint}"
        )
    if not isinstance(body, dict):
        raise RequestError(ErrorKind.invalid_request, "body is missing or not an object")
    lora = served.lora(body.get("model"))
    prompt = {MESSAGES: _messages(body.get("messages"))} if endpoint == CHAT else {PROMPT: _prompt(body.get("prompt"))}
    sampling = {**_sampling(body, endpoint), "lora": lora}
    return {ID: custom_id, **prompt, SAMPLING: sampling, MODEL: body["model"], URL: endpoint}


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise RequestError(ErrorKind.invalid_request, "body.prompt must be one string")
    return prompt


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(ErrorKind.invalid_messages, "body.messages must be a non-empty list of messages")
    turns = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise RequestError(ErrorKind.invalid_messages, f"message {n} is not a {{role, content}} object")
        role = _ROLES.get(message.get("role"))
        if role is None:
            raise RequestError(
                ErrorKind.invalid_messages,
                f"message {n} has role {message.get('role')!r}; roles are {', '.join(_ROLES)}",
            )
        turns.append({"role": role, "content": _text(message.get("content"), n)})
    return turns


def _text(content: Any, n: int) -> str:
    """A message's text: a string, or text parts joined by newlines (as vLLM's server joins them
    for a text-only model)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds == {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
        raise RequestError(
            ErrorKind.invalid_messages, f"message {n} has {', '.join(sorted(map(str, kinds - {'text'})))} parts"
        )
    raise RequestError(ErrorKind.invalid_messages, f"message {n} has no text content")


def _sampling(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    unknown = sorted(set(body) - set(SAMPLING_FIELDS) - _READ - _IGNORED)
    if unknown:
        raise RequestError(ErrorKind.invalid_request, f"body.{unknown[0]} is not supported")
    if body.get("stream"):
        raise RequestError(ErrorKind.invalid_request, "body.stream must be false in a batch")
    values: dict[str, Any] = {}
    for name, (key, kinds, _) in SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise RequestError(ErrorKind.invalid_request, f"body.{name} is {type(value).__name__}")
            values[key] = value
    stop = body.get("stop")
    if stop is not None:
        values["stop"] = [stop] if isinstance(stop, str) else stop
        if not isinstance(values["stop"], list) or not all(isinstance(s, str) for s in values["stop"]):
            raise RequestError(ErrorKind.invalid_request, "body.stop must be a string or a list of strings")
    values["logprobs"] = _logprobs(body, endpoint)
    values["json_schema"] = _json_schema(body.get("response_format"))
    return values


def _logprobs(body: dict[str, Any], endpoint: str) -> int | None:
    """Top alternatives per token: chat asks with `logprobs: true` and `top_logprobs`,
    completions with `logprobs: <int>`."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if endpoint == CHAT:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise RequestError(ErrorKind.invalid_request, "body.logprobs must be true or false")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise RequestError(ErrorKind.invalid_request, "body.top_logprobs must be an integer")
        return (top or 0) if logprobs else None
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise RequestError(ErrorKind.invalid_request, "body.logprobs must be an integer")
    return logprobs


def _json_schema(response_format: Any) -> str | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        found = response_format.get("json_schema")
        if isinstance(found, dict) and isinstance(found.get("schema"), dict):
            return json.dumps(found["schema"])
        raise RequestError(ErrorKind.invalid_request, "body.response_format.json_schema has no schema object")
    raise RequestError(ErrorKind.invalid_request, f"body.response_format type {kind!r} is not supported")
