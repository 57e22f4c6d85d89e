"""Shared prefixes travel once, end to end on the real engine and model, through the object
store and through files: conversations with one long system prompt (the chat template's
header included), conversations with none, and conversations whose system prompt shares only
its first part, ending inside a block. Every row generates what colocated generates, and the
KV that moves is each row's own blocks plus each shared block once. Through files, the files
are in a bucket, found (none recomputed) and gone once their rows are committed."""

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.bench.sample import SENTENCES
from pipeline.config import InputConfig
from pipeline.io.storage import read_output
from pipeline.job.run import run
from pipeline.kv.blocks import block_hashes
from pipeline.stages.tokenize import PromptEncoder
from tests.conftest import job_config
from tests.s3 import Bucket

pytestmark = pytest.mark.slow

SYSTEM = " ".join(SENTENCES[:12])
QUESTIONS = [f"In one line: what is {n} times {n + 3}, and why?" for n in range(14)]
MAX_TOKENS = 8
BLOCK_TOKENS = 64


def _conversation(system: str | None, question: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    half = SYSTEM[: len(SYSTEM) // 2]
    rows = [(f"shared{i}", _conversation(SYSTEM, q)) for i, q in enumerate(QUESTIONS[:8])]
    rows += [(f"alone{i}", _conversation(None, q)) for i, q in enumerate(QUESTIONS[8:11])]
    rows += [(f"part{i}", _conversation(f"{half} Variant {i}.", q)) for i, q in enumerate(QUESTIONS[11:])]
    path = tmp_path_factory.mktemp("conversations") / "conversations.parquet"
    pq.write_table(pa.table({"id": [r for r, _ in rows], "messages": [m for _, m in rows]}), path)
    return path


def _overrides(path, output) -> list[str]:
    return [
        f"input.path={path}",
        "input.messages_column=messages",
        f"output.path={output}",
        f"sampling.max_tokens={MAX_TOKENS}",
    ]


def _tokens_by_id(output) -> dict[str, list[int]]:
    table = read_output(str(output))
    assert table.column("error").null_count == table.num_rows, table.column("error").to_pylist()
    return dict(zip(table.column("id").to_pylist(), table.column("generated_tokens").to_pylist()))


@pytest.fixture(scope="module")
def colocated(ray_cluster, conversations, tmp_path_factory):
    output = tmp_path_factory.mktemp("colocated")
    run(job_config("mode=colocated", *_overrides(conversations, output)))
    return _tokens_by_id(output)


def _expected_blocks(model, path) -> tuple[int, int, int]:
    """Prompt tokens in all, shared blocks named by rows, distinct shared blocks: the rows that
    share a prefix go to prefill in one batch, where a block is shared when another row has the
    same prefix to its end."""
    encoder = PromptEncoder(model, InputConfig(path=str(path), messages_column="messages"), MAX_TOKENS)
    prompts = [encoder.encode(m)[0] for m in pq.read_table(path).column("messages").to_pylist()]
    chains = [block_hashes(p, BLOCK_TOKENS, b"") for p in prompts]
    counts = Counter(h for chain in chains for h in chain)
    named = [
        [h for h in chain[: next((j for j, h in enumerate(chain) if counts[h] < 2), len(chain))]] for chain in chains
    ]
    return sum(map(len, prompts)), sum(map(len, named)), len({h for n in named for h in n})


@pytest.mark.parametrize(
    "transport",
    [
        [],
        # Through files in a bucket, with a decode engine cache too small to keep the shared
        # prefix for the run (0.1 GiB: 18 blocks of 128 tokens) and a block cache that keeps
        # no block.
        ["kv.transport=storage", "engine.kv_cache_gib=0.1", "kv.block_cache_gib=0.001"],
    ],
    ids=["object_store", "storage_evicting"],
)
def test_shared_blocks_travel_once_and_tokens_equal_colocated(
    ray_cluster, s3: Bucket, model, conversations, colocated, transport, tmp_path
):
    output, storage = tmp_path / "out", f"{s3.url}/{tmp_path.name}/kv"
    metrics = run(
        job_config("mode=disaggregated", *_overrides(conversations, output), *transport, f"kv.storage_path={storage}")
    )
    assert _tokens_by_id(output) == colocated
    tokens, referenced, stored = _expected_blocks(model, conversations)
    assert 0 < stored < referenced
    block = model.cache.bytes_per_token * BLOCK_TOKENS
    assert (metrics.kv_blocks_referenced, metrics.kv_blocks_stored, metrics.kv_blocks_fetched) == (
        referenced,
        stored,
        stored,
    )
    assert metrics.kv_bytes_moved == model.cache.bytes_per_token * tokens - (referenced - stored) * block
    assert metrics.kv_bytes_saved == (referenced - stored) * block
    assert metrics.kv_recomputed_rows == 0
    if transport:
        assert s3.fs().find(storage) == []


TEAMS, TEAM_ROWS = 4, 8


@pytest.fixture(scope="module")
def teams(tmp_path_factory):
    """Four system prompts that differ from their first tokens, each before eight questions;
    the teams' rows interleaved (row i: team i % 4)."""
    rows = [
        (f"t{i}", _conversation(f"Team {i % TEAMS}. {SYSTEM}", QUESTIONS[i // TEAMS])) for i in range(TEAMS * TEAM_ROWS)
    ]
    path = tmp_path_factory.mktemp("teams") / "teams.parquet"
    pq.write_table(pa.table({"id": [r for r, _ in rows], "messages": [m for _, m in rows]}), path)
    return path


def test_rows_sharing_a_prefix_reach_the_same_workers(ray_cluster, model, teams, tmp_path):
    """Two prefill and two decode workers taking blocks of eight rows: ordered by prompt, each
    team's rows make one block, so each shared block is stored by one batch, on one prefill
    worker, and fetched by one decode worker: the bytes of one worker each. (In input order
    every block holds every team, and every batch stores, and every decode worker fetches,
    every team's blocks: 24 stores and 16 fetches here.)"""
    pools = [f"pools.{p}.{k}" for p in ("prefill", "decode") for k in ("size=2", "batch_size=8", "num_cpus=0.2")]
    metrics = run(
        job_config("mode=disaggregated", *_overrides(teams, tmp_path / "out"), *pools, "engine.kv_cache_gib=0.25")
    )
    assert len(_tokens_by_id(tmp_path / "out")) == TEAMS * TEAM_ROWS
    tokens, referenced, distinct = _expected_blocks(model, teams)
    assert distinct == 2 * TEAMS and referenced == 2 * TEAMS * TEAM_ROWS  # two whole blocks a team
    assert (metrics.kv_blocks_referenced, metrics.kv_blocks_stored, metrics.kv_blocks_fetched) == (
        referenced,
        distinct,
        distinct,
    )
    block = model.cache.bytes_per_token * BLOCK_TOKENS
    assert metrics.kv_bytes_moved == model.cache.bytes_per_token * tokens - (referenced - distinct) * block
    assert metrics.stages["prefill"].workers == metrics.stages["decode"].workers == 2
