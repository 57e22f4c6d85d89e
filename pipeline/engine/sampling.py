"""Sampling per row: the job's `sampling.*`, with a row's own values over them, as vLLM's
SamplingParams.

A row's values are the non-null fields of its `input.sampling_column` struct (any of
SamplingConfig's keys), carried with the row through every stage, so prefill and decode, or two
split jobs, read the same. Values are checked here, so that a bad one is that row's error
(`invalid_sampling`, naming the field) or, in the job's own config, a one-line refusal; what the
engine still refuses is the row's error alone too (pipeline/engine/loop.py). Values are bounded
(numbers finite, `n`, stop strings, patterns and schemas not without limit), and a value that
breaks its own check (a pattern too large to compile, a schema nested too deep to parse) is its
row's error like any other bad value."""

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from pipeline.columns import ROW, InvalidUTF8, python_values
from pipeline.config import SamplingConfig
from pipeline.errors import JobError

if TYPE_CHECKING:
    from vllm import SamplingParams

KEYS = tuple(f.name for f in fields(SamplingConfig))
STRUCTURED = ("json_schema", "regex", "choice")
MAX_LOGPROBS = 20  # vLLM's default engine limit
MAX_N = 128  # completions per prompt, as OpenAI's API allows
MAX_INT = 2**31 - 1  # token counts and ids: what the engine's int32 tensors hold
MAX_STRINGS = 64  # stop strings, and choices
MAX_STRUCTURE_CHARS = 64 << 10  # a regular expression or a JSON schema's text
MAX_SCHEMA_DEPTH = 64  # a JSON schema's nesting of objects and arrays


def _number(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, not {value}"
        if value < low or value > high or (low_open and value == low):
            return f"must be in {'(' if low_open else '['}{_shown(low)}, {_shown(high)}], not {_shown(value)}"
        return None

    return check


def _shown(number: float) -> str:
    shown = str(number) if isinstance(number, int) else f"{number:g}"
    return shown if len(shown) <= 24 else f"{shown[:21]}..."


def _integer(low: int, high: int = MAX_INT) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return _number(low, high)(value)

    return check


def _list_of(kind: type, what: str, most: int = MAX_STRINGS) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return f"must be a list of {what}"
        if len(value) > most:
            return f"holds {len(value)} {what}; at most {most}"
        if kind is int and not all(0 <= v <= MAX_INT for v in value):
            return f"must be a list of {what} in [0, {MAX_INT}]"
        return None

    return check


def schema(value: str | dict) -> dict:
    """A JSON schema given as a mapping or as JSON text."""
    return value if isinstance(value, dict) else json.loads(value)


def _json_schema(value: Any) -> str | None:
    import jsonschema

    if problem := _too_long(value):
        return problem
    try:
        parsed = schema(value)
    except (TypeError, json.JSONDecodeError) as error:
        return f"is not JSON text or a mapping ({error})"
    if depth(parsed) > MAX_SCHEMA_DEPTH:
        return f"nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep"
    try:
        jsonschema.validators.validator_for(parsed).check_schema(parsed)
    except jsonschema.SchemaError as error:
        return f"is not a valid JSON schema ({error.message})"
    return None


def _too_long(structure: Any) -> str | None:
    """Why a pattern or schema given as text is too long to compile for one row, if it is."""
    if isinstance(structure, str) and len(structure) > MAX_STRUCTURE_CHARS:
        return f"is {len(structure)} characters long; at most {MAX_STRUCTURE_CHARS}"
    return None


def depth(value: Any) -> int:
    """How deep objects and arrays nest in a JSON value (counted without recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            todo += [(v, level + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


def _regex(value: Any) -> str | None:
    if problem := _too_long(value):
        return problem
    try:
        re.compile(value)
    except (TypeError, re.error) as error:
        return f"is not a regular expression ({error})"
    return None


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "max_tokens": _integer(1),
    "min_tokens": _integer(0),
    "temperature": _number(0.0),
    "top_p": _number(0.0, 1.0, low_open=True),
    "top_k": _integer(-1),
    "min_p": _number(0.0, 1.0),
    "seed": _integer(-(2**63), 2**63 - 1),
    "stop": _list_of(str, "strings"),
    "stop_token_ids": _list_of(int, "token ids"),
    "ignore_eos": lambda v: None if isinstance(v, bool) else "must be true or false",
    "repetition_penalty": _number(0.0, low_open=True),
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "json_schema": _json_schema,
    "regex": _regex,
    "choice": lambda v: _list_of(str, "strings")(v) or (None if v else "must not be empty"),
    "logprobs": _integer(0, MAX_LOGPROBS),
    "n": _integer(1, MAX_N),
    # Which adapters the job has is the engine's to know: a name it lacks is `unknown_lora`.
    "lora": lambda v: None if isinstance(v, str) and v else "must be a LoRA adapter's name",
}


def check(values: dict[str, Any]) -> str | None:
    """What is wrong with a set of sampling values (the job's merged with a row's), or None."""
    for key, value in values.items():
        if value is None:
            continue
        try:
            problem = CHECKS[key](value)
        except Exception as error:  # a value that breaks its check (re's OverflowError, a RecursionError)
            problem = f"cannot be used ({type(error).__name__}: {error})"
        if problem:
            return f"{key} {problem}"
    if values["min_tokens"] > values["max_tokens"]:
        return f"min_tokens ({values['min_tokens']}) must not exceed max_tokens ({values['max_tokens']})"
    if values["n"] > 1 and values["temperature"] == 0:
        return f"n={values['n']} needs a temperature above 0: greedy samples are all the same"
    if sum(values[k] is not None for k in STRUCTURED) > 1:
        return f"at most one of {', '.join(STRUCTURED)}"
    return None


def derived_seed(seed: int, row: int) -> int:
    """A row's own seed, from the job's and the row's number."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative signed 64-bit integer


@dataclass(frozen=True)
class RowSampling:
    job: SamplingConfig
    column: str  # input.sampling_column
    row_keys: tuple[str, ...] = ()  # the keys its struct has, in the job's input

    @classmethod
    def of(cls, job: SamplingConfig, column: str, schema: pa.Schema) -> "RowSampling":
        """The job's sampling with its input's per-row column: a struct of sampling keys, or
        refused before any work."""
        if column not in schema.names:
            return cls(job, column)
        kind = schema.field(column).type
        if not pa.types.is_struct(kind):
            raise JobError(f"input column {column} (input.sampling_column) is {kind}, not a struct of sampling keys")
        keys = tuple(f.name for f in kind)
        unknown = [k for k in keys if k not in KEYS]
        if unknown:
            raise JobError(
                f"input column {column} has fields {', '.join(unknown)}; sampling keys are {', '.join(KEYS)}"
            )
        return cls(job, column, keys)

    @property
    def logprobs_column(self) -> bool:
        return self.job.logprobs is not None or "logprobs" in self.row_keys

    @property
    def many(self) -> bool:
        """Whether rows may have several completions: then every row's are a list."""
        return self.job.n > 1 or "n" in self.row_keys

    def values(self, batch: pa.Table) -> list[dict[str, Any] | InvalidUTF8]:
        """Per row, the job's values with the row's own over them (or why its own cannot be
        read); a job-wide seed becomes each row's own, derived from its row number."""
        own = python_values(batch.column(self.column)) if self.column in batch.column_names else [{}] * batch.num_rows
        base = asdict(self.job)
        rows: list[dict[str, Any] | InvalidUTF8] = []
        for row, number in zip(own, batch.column(ROW).to_pylist()):
            if isinstance(row, InvalidUTF8):
                rows.append(row)
                continue
            values = {k: v for k, v in (row or {}).items() if v is not None}
            if "seed" not in values and self.job.seed is not None:
                values["seed"] = derived_seed(self.job.seed, number)
            rows.append({**base, **values})
        return rows

    def params(self, values: dict[str, Any], max_tokens: int) -> "SamplingParams":
        """A row's SamplingParams, generating at most `max_tokens` (its budget: sampling
        max_tokens, or fewer where the context ends first)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = {
            name: schema(values[key]) if key == "json_schema" else values[key]
            for key, name in zip(STRUCTURED, ("json", "regex", "choice"))
            if values[key] is not None
        }
        return SamplingParams(
            n=values["n"],  # vLLM gives sample i the seed + i
            max_tokens=max_tokens,
            min_tokens=min(values["min_tokens"], max_tokens),
            temperature=values["temperature"],
            top_p=values["top_p"],
            top_k=values["top_k"],
            min_p=values["min_p"],
            seed=values["seed"],
            stop=values["stop"] or None,
            stop_token_ids=values["stop_token_ids"] or None,
            ignore_eos=values["ignore_eos"],
            repetition_penalty=values["repetition_penalty"],
            presence_penalty=values["presence_penalty"],
            frequency_penalty=values["frequency_penalty"],
            logprobs=values["logprobs"],
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it finishes
            detokenize=bool(values["stop"]),  # vLLM matches stop strings on text
        )

    def prefill(self, kv_key: str, save_from: int = 0) -> "SamplingParams":
        """A prefill request: the prompt's KV from token `save_from` on, and one greedy token."""
        from pipeline.kv.handoff import SAVE_FROM

        params = with_kv_key(self.params(asdict(SamplingConfig()), 1), kv_key)
        params.extra_args["kv_transfer_params"][SAVE_FROM] = save_from
        return params


def with_kv_key(params: "SamplingParams", kv_key: str | None) -> "SamplingParams":
    """A request that hands its KV over under `kv_key` (pipeline/kv/handoff.py); None: it
    prefills its prompt itself."""
    from pipeline.kv.handoff import KEY

    if kv_key is not None:
        params.extra_args = {"kv_transfer_params": {KEY: kv_key}}
    return params
