"""Rows that share a prompt prefix, next to each other. The engines take a shard's rows in
blocks of consecutive rows and Ray Data hands each block to any worker of a pool, so rows
grouped by their prompt's beginning share blocks, and with them workers: a shared prefix is
computed, stored and fetched by as few workers as its rows need (pipeline/kv/blocks.py), and
the engines' prefix caches hit. Rows that begin like no other keep their input order: sorting
them would only put prompts of one kind (and length) together, and the prefill and decode pools
would take turns waiting on each other's long batches. The commit puts every shard back in
input order (pipeline/io/commit.py).

A prompt column of a type no prompt has (numbers, structs without a role) is left in input
order: ordering is an optimisation, and tokenize gives such rows their errors."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Rows whose prompts begin with the same GROUP_BYTES bytes go together: about one shared block
# (kv.shared_block_tokens, 64) of token ids, or of English text.
GROUP_BYTES = 256
# Between a turn's role and its content, and between turns: bytes no text holds.
_ROLE_END, _TURN_END = pa.scalar("\x01", pa.large_string()), pa.scalar("\x00", pa.large_string())

log = logging.getLogger(__name__)


def order_by_prefix(table: pa.Table, column: str) -> pa.Table:
    """`table` with the rows whose prompts (text, token ids or conversations in `column`) begin
    alike together, where the first of them was, sorted by prompt among themselves, so the
    longest shared prefixes are next to each other; every other row in input order."""
    if table.num_rows < 2:
        return table
    try:
        keys = pc.fill_null(prefix_keys(table.column(column).combine_chunks()), b"")
    except (pa.ArrowException, KeyError) as error:
        log.debug("prompts of type %s are not ordered by prefix: %s", table.schema.field(column).type, error)
        return table
    # Group numbers by first appearance: a group sits where its first row was.
    groups = pc.dictionary_encode(pc.binary_slice(keys, 0, GROUP_BYTES)).indices.to_numpy()
    if np.all(groups[1:] > groups[:-1]):  # no two rows begin alike: nothing moves, nothing is copied
        return table
    rank = np.empty(len(keys), np.int64)
    rank[pc.sort_indices(keys).to_numpy()] = np.arange(len(keys))
    return table.take(np.lexsort((rank, groups)))


def prefix_keys(prompts: pa.Array) -> pa.Array:
    """A byte string per prompt that sorts as the prompt: two prompts that begin with the same
    text, token ids or turns have keys that begin with the same bytes."""
    if pa.types.is_dictionary(prompts.type):
        prompts = prompts.cast(prompts.type.value_type)
    if pa.types.is_list(prompts.type) or pa.types.is_large_list(prompts.type):
        values = prompts.values
        if pa.types.is_struct(values.type):  # a conversation: role and content of each turn
            role, content = (pc.fill_null(values.field(f).cast(pa.large_string()), "") for f in ("role", "content"))
            turns = pc.binary_join_element_wise(role, content, _ROLE_END)
            conversations = type(prompts).from_arrays(prompts.offsets, turns, mask=prompts.is_null())
            return pc.binary_join(conversations, _TURN_END).cast(pa.large_binary())
        return _token_keys(prompts)
    return prompts.cast(pa.large_binary())


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
