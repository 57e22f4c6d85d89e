"""Column names of the output contract and of the columns stages hand each other, and the one
way stages add columns to a batch (pyarrow in, pyarrow out, so carried input columns keep
their exact types)."""
from collections import Counter

import pyarrow as pa

# Output contract (names follow Ray Data LLM's).
ID = "id"
GENERATED_TEXT = "generated_text"
GENERATED_TOKENS = "generated_tokens"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_GENERATED_TOKENS = "num_generated_tokens"
FINISH_REASON = "finish_reason"
ERROR = "error"
OUTPUT = (ID, GENERATED_TEXT, GENERATED_TOKENS, NUM_INPUT_TOKENS, NUM_GENERATED_TOKENS, FINISH_REASON, ERROR)

# Between stages, and in a prefill dataset.
PROMPT_TOKENS = "prompt_token_ids"
KV_PAYLOAD = "kv_payload"
STAGE_COLUMNS = (PROMPT_TOKENS, KV_PAYLOAD, GENERATED_TOKENS, NUM_INPUT_TOKENS, FINISH_REASON, ERROR)

# Between stages only.
INTERNAL = "__kvrelay_"  # prefix of the columns below, which are never written out
ROW = "__kvrelay_row"  # job-wide input row number: orders and deduplicates the committed output
KV_FILE = "__kvrelay_kv_file"  # a payload file to remove once its row is committed

TOKEN_LIST = pa.list_(pa.int32())


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


def row_error(kind: str, detail: str) -> str:
    """A row's error: a stable kind to filter and count by, then what exactly was wrong."""
    return f"{kind}: {detail}"


def error_kinds(errors: pa.ChunkedArray) -> dict[str, int]:
    return dict(Counter(e.split(":", 1)[0] for e in errors.drop_null().to_pylist()))
