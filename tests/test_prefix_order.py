"""Rows sharing a prompt prefix go to the engines together: in each shard, the rows whose
prompts (text, token ids or conversations) begin with the same bytes are grouped where the first
of them was, sorted among themselves; every other row keeps its input order; no row is lost and
shards never mix."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.columns import ROW
from pipeline.io.prefix_order import GROUP_BYTES, order_by_prefix
from pipeline.io.source import UNIT, PromptSource
from pipeline.stages.tokenize import PromptEncoder, prompt_values
from tests.conftest import job_config

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
A, B = "a" * GROUP_BYTES, "b" * GROUP_BYTES  # long enough to begin alike


def _order(values: list, type: pa.DataType) -> list[int]:
    table = pa.table({"prompt": pa.array(values, type), "n": range(len(values))})
    return order_by_prefix(table, "prompt").column("n").to_pylist()


def test_rows_that_begin_alike_go_together_where_the_first_was():
    prompts = [A + "x", "solo", B + "y", A + "b", None, B + "a", "also solo", "solo"]
    assert _order(prompts, pa.string()) == [3, 0, 1, 7, 5, 2, 4, 6]
    assert _order(["z", "y", "x"], pa.string()) == [0, 1, 2]  # nothing shared: input order
    assert _order([b"\xff" + A.encode(), b"a", b"\xff" + A.encode()], pa.binary()) == [0, 2, 1]


def test_token_ids_group_by_their_first_block_and_sort_as_numbers():
    shared = list(range(1000, 1000 + GROUP_BYTES // 4))  # GROUP_BYTES of int32 ids
    prompts = [[*shared, 256], [7, 8], [*shared, 5], None, [7, 9]]
    # Within the group 5 before 256: little-endian bytes would put 256 (00 01 ..) first.
    assert _order(prompts, pa.list_(pa.int32())) == [2, 0, 1, 3, 4]


def test_conversations_group_by_turns_roles_included():
    def conversation(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    prompts = [
        conversation(("user", "b")),
        conversation(("system", A), ("user", "x")),
        None,
        conversation(("system", A), ("user", "a")),
        conversation(("user", "a")),
        conversation(("user", A)),  # the same text as the system turns, in another role
    ]
    table = pa.table({"prompt": pa.array(prompts, pa.list_(TURN)), "n": range(len(prompts))})
    assert order_by_prefix(table.slice(1), "prompt").column("n").to_pylist() == [3, 1, 2, 4, 5]


def test_the_reader_orders_each_shard_and_keeps_its_rows(tmp_path):
    prompts = [f"{(A, B)[i % 2]} question {i}" for i in range(10)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet", row_group_size=3)
    cfg = job_config(f"input.path={tmp_path}")
    source = PromptSource(cfg.input, 4, ("prompt",))
    reader = source.reader(source.shards, order_by="prompt")
    shards = list(reader(pa.table({UNIT: list(reader.units)})))
    assert [t.column(ROW).to_pylist() for t in shards] == [[0, 2, 1, 3], [4, 6, 5, 7], [8, 9]]
    assert all(t.column("prompt").to_pylist() == [prompts[r] for r in t.column(ROW).to_pylist()] for t in shards)


TURNS = [
    [{"role": "user", "content": A + "x"}],
    [{"role": "user", "content": "solo"}],
    [{"role": "user", "content": A}],
]
LARGE_TURN = pa.struct([("role", pa.large_string()), ("content", pa.large_string())])


@pytest.mark.parametrize(
    "column, values, kind, error",
    [
        ("messages", TURNS, pa.large_list(LARGE_TURN), None),
        ("prompt", [A + "x", "solo", A], pa.string_view(), None),
        ("messages", [[{"content": A}]] * 3, pa.list_(pa.struct([("content", pa.string())])), "invalid_messages"),
        ("prompt", [1, 2, 1], pa.int64(), "not_text"),
        ("prompt", [[A], ["solo"], [A]], pa.list_(pa.string()), "invalid_token_ids"),
    ],
    ids=["polars-conversations", "string-view", "turns-without-role", "integers", "string-lists"],
)
def test_prompts_of_any_type_are_read_and_get_their_rows_errors(model, tmp_path, column, values, kind, error):
    """The reader (ordering by prefix, as by default) never fails on a prompt column that
    tokenize takes or refuses row by row; view types (Polars, DuckDB) are read as large types,
    which every later stage can take, sort and concatenate."""
    carried = pa.array(["a", "b", "c"], pa.string_view())
    pq.write_table(pa.table({column: pa.array(values, kind), "note": carried}), tmp_path / "in.parquet")
    cfg = job_config(f"input.path={tmp_path}", *(["input.messages_column=messages"] if column == "messages" else []))
    source = PromptSource(cfg.input, 10, (column,))
    reader = source.reader(source.shards, order_by=column)
    (table,) = reader(pa.table({UNIT: list(reader.units)}))
    assert sorted(table.column(ROW).to_pylist()) == [0, 1, 2] and table.column("note").type == pa.large_string()
    assert table.take([2, 0, 1]).num_rows == 3  # as the commit puts rows back in order
    _, got = PromptEncoder(model, cfg.input, 16).encode_all(prompt_values(table.column(column)), [None] * 3)
    assert [e and e.split(":")[0] for e in got] == [error] * 3
