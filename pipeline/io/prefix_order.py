"""Rows that share a prompt prefix, next to each other. The engines take a shard's rows in
blocks of consecutive rows and Ray Data hands each block to any worker of a pool, so rows
sorted by their prompt share blocks, and with them workers: a shared prefix is computed,
stored and fetched by as few workers as its rows need (pipeline/kv/blocks.py), and the
engines' prefix caches hit. The commit puts every shard back in input order
(pipeline/io/commit.py)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Between a turn's role and its content, and between turns: bytes no text holds.
_ROLE_END, _TURN_END = "\x01", "\x00"


def order_by_prefix(table: pa.Table, column: str) -> pa.Table:
    """`table` sorted by `column` (text, token ids or a conversation), stable: rows whose
    prompts begin alike end up together, equal prompts in input order."""
    if table.num_rows < 2:
        return table
    return table.take(pc.sort_indices(prefix_keys(table.column(column).combine_chunks())))


def prefix_keys(prompts: pa.Array) -> pa.Array:
    """A byte string per prompt that sorts as the prompt's prefix: two prompts that begin with
    the same text, token ids or turns have keys that begin with the same bytes."""
    if pa.types.is_dictionary(prompts.type):
        prompts = prompts.cast(prompts.type.value_type)
    if pa.types.is_list(prompts.type) or pa.types.is_large_list(prompts.type):
        values = prompts.values
        if pa.types.is_struct(values.type):  # a conversation: role and content of each turn
            turns = pc.binary_join_element_wise(
                pc.fill_null(values.field("role"), ""), pc.fill_null(values.field("content"), ""), _ROLE_END
            )
            return pc.binary_join(type(prompts).from_arrays(prompts.offsets, turns, mask=prompts.is_null()), _TURN_END)
        return _token_keys(prompts)
    return prompts.cast(pa.large_binary()) if pa.types.is_large_string(prompts.type) else prompts.cast(pa.binary())


def _token_keys(prompts: pa.Array) -> pa.Array:
    """Token ids as big-endian bytes, so that byte order is the ids' order (a null prompt: no
    bytes)."""
    prompts = prompts.cast(pa.list_(pa.int64()))
    values = pc.list_flatten(prompts).to_numpy(zero_copy_only=False).astype(">u4")
    lengths = pc.fill_null(pc.list_value_length(prompts), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64) * 4])
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(prompts), [None, pa.py_buffer(offsets), pa.py_buffer(values.tobytes())]
    )
