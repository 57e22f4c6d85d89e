"""Rows sharing a prompt prefix go to the engines together: each shard's rows ordered by their
prompts (text, token ids or conversations), stably, every row kept, shards never mixed."""

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.columns import ROW
from pipeline.io.prefix_order import order_by_prefix
from pipeline.io.source import UNIT, PromptSource
from tests.conftest import job_config

TURN = pa.struct([("role", pa.string()), ("content", pa.string())])


def _order(values: list, type: pa.DataType) -> list[int]:
    table = pa.table({"prompt": pa.array(values, type), "n": range(len(values))})
    return order_by_prefix(table, "prompt").column("n").to_pylist()


def test_text_sorts_by_its_bytes_equal_prompts_in_input_order():
    assert _order(["b", "ab", None, "aa", "b", "a"], pa.string()) == [5, 3, 1, 0, 4, 2]
    assert _order([b"\xff", b"a"], pa.binary()) == [1, 0]


def test_token_ids_sort_as_numbers_common_leading_ids_together():
    prompts = [[5, 300, 2], [5, 1], None, [5, 300, 1], [70000], [5, 300], [256]]
    assert _order(prompts, pa.list_(pa.int32())) == [2, 1, 5, 3, 0, 6, 4]


def test_conversations_sort_by_turns_roles_included():
    def conversation(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    prompts = [
        conversation(("user", "b")),
        conversation(("system", "S"), ("user", "x")),
        None,
        conversation(("system", "S"), ("user", "a")),
        conversation(("user", "a")),
        conversation(("user", "S")),  # the same text as another row's system turn, not its prefix
    ]
    table = pa.table({"prompt": pa.array(prompts, pa.list_(TURN)), "n": range(len(prompts))})
    assert order_by_prefix(table.slice(1), "prompt").column("n").to_pylist() == [3, 1, 5, 4, 2]


def test_the_reader_orders_each_shard_and_keeps_its_rows(tmp_path):
    prompts = [f"{'AB'[i % 2]} question {i}" for i in range(10)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet", row_group_size=3)
    cfg = job_config(f"input.path={tmp_path}")
    source = PromptSource(cfg.input, 4, ("prompt",))
    reader = source.reader(source.shards, order_by="prompt")
    shards = list(reader(pa.table({UNIT: list(reader.units)})))
    assert [t.column(ROW).to_pylist() for t in shards] == [[0, 2, 1, 3], [4, 6, 5, 7], [8, 9]]
    assert all(t.column("prompt").to_pylist() == [prompts[r] for r in t.column(ROW).to_pylist()] for t in shards)
