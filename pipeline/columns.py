"""The output contract: its column names, the kinds of row error, and the columns stages hand
each other; and the one way stages add columns to a batch (pyarrow in, pyarrow out, so carried
input columns keep their exact types)."""

from collections import Counter
from dataclasses import dataclass
from enum import Enum

import pyarrow as pa
import pyarrow.compute as pc

# Output contract (names follow Ray Data LLM's).
ID = "id"
GENERATED_TEXT = "generated_text"
GENERATED_TOKENS = "generated_tokens"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_GENERATED_TOKENS = "num_generated_tokens"
FINISH_REASON = "finish_reason"
LOGPROBS = "logprobs"  # when asked for (sampling.logprobs, or per row)
ERROR = "error"
ERROR_KIND = "error_kind"  # the ErrorKind of `error`, to filter by
OUTPUT = (
    ID,
    GENERATED_TEXT,
    GENERATED_TOKENS,
    NUM_INPUT_TOKENS,
    NUM_GENERATED_TOKENS,
    FINISH_REASON,
    ERROR,
    ERROR_KIND,
)

# Between stages, and in a prefill dataset.
PROMPT_TOKENS = "prompt_token_ids"
KV_PAYLOAD = "kv_payload"
STAGE_COLUMNS = (PROMPT_TOKENS, KV_PAYLOAD, GENERATED_TOKENS, NUM_INPUT_TOKENS, FINISH_REASON, ERROR)

# Between stages only.
INTERNAL = "__kvrelay_"  # prefix of the columns below, which are never written out
ROW = "__kvrelay_row"  # job-wide input row number: orders and deduplicates the committed output
KV_FILE = "__kvrelay_kv_file"  # a payload file to remove once its row is committed
ENGINE_TEXT = "__kvrelay_text"  # the engine's own text of a completion cut at a stop string
IMAGES = "__kvrelay_images"  # a row's image URLs, in prompt order (a vision-language model's rows)
IMAGES_DIGEST = "__kvrelay_images_digest"  # what the row's images are (pipeline/io/images.py); null: none

TOKEN_LIST = pa.list_(pa.int32())
TOKEN_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])
# Per generated token: the token's logprob and the top alternatives', most likely first.
LOGPROB_LIST = pa.list_(
    pa.struct([("token_id", pa.int32()), ("logprob", pa.float32()), ("top", pa.list_(TOKEN_LOGPROB))])
)


def with_columns(table: pa.Table, **columns: pa.Array | list) -> pa.Table:
    """Set (replace or append) columns of a batch."""
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        if index < 0:
            table = table.append_column(name, pa.array(values) if isinstance(values, list) else values)
        else:
            table = table.set_column(index, name, pa.array(values) if isinstance(values, list) else values)
    return table


def pending(table: pa.Table) -> list[int]:
    """Rows still to be generated: no error and not yet finished."""
    errors = table.column(ERROR).to_pylist()
    finished = table.column(FINISH_REASON).to_pylist()
    return [i for i, (e, f) in enumerate(zip(errors, finished)) if e is None and f is None]


class ErrorKind(str, Enum):
    """What was wrong with a row: the stable first word of its `error`, to filter and count by."""

    # The input row (input.duplicate_ids=error: every row after the first with an id).
    null_id = "null_id"
    duplicate_id = "duplicate_id"
    # Its prompt: text, or token ids (a prompt column of integer lists, or a prefill dataset's).
    null_prompt = "null_prompt"
    not_text = "not_text"
    invalid_utf8 = "invalid_utf8"
    empty_prompt = "empty_prompt"
    overlong_prompt = "overlong_prompt"  # input.overlong=error: no room left for max_tokens
    invalid_token_ids = "invalid_token_ids"
    invalid_first_token = "invalid_first_token"  # a prefill dataset's row holds one first token
    invalid_messages = "invalid_messages"  # a conversation that is not a list of {role, content} turns
    image_unreadable = "image_unreadable"  # one of its images cannot be fetched or decoded
    # An OpenAI Batch line (input.format=openai_batch) that is not a request the job can run.
    invalid_request = "invalid_request"
    unknown_model = "unknown_model"  # its body.model is not what the job serves
    # Its sampling values (input.sampling_column over sampling.*), and what else the engine refuses.
    invalid_sampling = "invalid_sampling"
    unknown_lora = "unknown_lora"  # its lora names no adapter of engine.lora.adapters
    engine_refused = "engine_refused"
    # Its KV payload, at decode time.
    kv_mismatch = "kv_mismatch"  # made for another engine (model, LoRA adapter, format, shape, dtype, codec)
    kv_corrupt = "kv_corrupt"  # damaged on the way (kv.on_load_failure=error; else recomputed)
    kv_missing = "kv_missing"  # its file is gone (kv.on_load_failure=error; else recomputed)
    kv_unreadable = "kv_unreadable"  # its storage fails after retries, or refuses access (likewise)
    kv_unsafe_path = "kv_unsafe_path"  # its file name could leave kv.storage_path: refused


def row_error(kind: ErrorKind, detail: str) -> str:
    """A row's error: its kind, then what exactly was wrong."""
    return f"{kind.value}: {detail}"


def error_kind(errors: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each row's ErrorKind, from its error (null where it has none)."""
    return pc.list_element(pc.split_pattern(errors, pattern=": ", max_splits=1), 0)


def error_kinds(errors: pa.ChunkedArray) -> dict[str, int]:
    return dict(Counter(error_kind(errors).drop_null().to_pylist()))


def generated_token_count(tokens: pa.ChunkedArray) -> int:
    """The tokens of a generated_tokens column: one completion a row, or a list of n."""
    if pa.types.is_list(tokens.type.value_type):
        tokens = pc.list_flatten(tokens)
    return int(pc.sum(pc.list_value_length(tokens)).as_py() or 0)


@dataclass(frozen=True)
class InvalidUTF8:
    """A row's value that holds text which is not valid UTF-8 (Parquet does not check): that
    row's error, not its batch's."""

    reason: str

    def error(self, what: str) -> str:
        return row_error(ErrorKind.invalid_utf8, f"{what} is not valid UTF-8 ({self.reason})")


def python_values(column: pa.ChunkedArray) -> list:
    """The column as Python values, row by row where a row's text cannot be decoded: that row
    is an InvalidUTF8."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_python_value(value) for value in column]


def _python_value(value: pa.Scalar) -> object:
    try:
        return value.as_py()
    except UnicodeDecodeError as error:
        return InvalidUTF8(f"{error.reason} at byte {error.start}")
