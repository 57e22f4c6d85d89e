"""Committing shards without the rows passing through the driver. The driver keeps a ledger of
which rows of each shard the workers have written (their fragments' row numbers); once a
shard's fragments hold every one of its rows, a Ray task on a worker merges them into the
shard's part: each row once, in input order, written aside and moved into place
(`commit_shard`). The shards that one batch of fragments completes share a task. Rows that
arrive for a shard already committed (a batch redone after a worker died) are dropped and
counted."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from pipeline.columns import INTERNAL, KV_FILE, ROW
from pipeline.io.lease import OutputLease
from pipeline.io.output import OutputTarget, ShardStats, read_stats, write_part
from pipeline.io.source import Shard
from pipeline.io.storage import filesystem
from pipeline.stages.write import OUTPUT_TOKENS, PATH, ROWS, SHARD, read_fragment

if TYPE_CHECKING:  # a commit task imports the payload code (and torch) only when it has files to remove
    from pipeline.kv.store import PayloadStore


def commit_shard(url: str, part: str, shard: Shard, fragments: list[str], store: "PayloadStore | None") -> ShardStats:
    """The shard's fragments -> its part, on a worker (`commit_shards`); the rows' payload files
    go once the part holds the rows. Idempotent: a retry finds the part in place and only clears
    up."""
    fs, arrow_fs, _ = filesystem(url)
    fragments = [path for path in fragments if fs.exists(path)]  # a retry's: some may be gone
    written = fs.exists(part)
    table = None
    if fragments and (store or not written):
        table = pa.concat_tables([read_fragment(fs, path) for path in fragments], promote_options="permissive")
    if written:
        stats = read_stats(arrow_fs, part)
    else:
        rows, first = np.unique(table.column(ROW).to_numpy(), return_index=True)
        if len(rows) != shard.num_rows or rows[0] != shard.first_row:
            raise RuntimeError(f"shard {shard.index}: fragments hold {len(rows)} of its {shard.num_rows} rows")
        table = table.take(pa.array(first))  # one copy of each row, in input order
        committed = table.drop_columns([c for c in table.column_names if c.startswith(INTERNAL)])
        stats = ShardStats.of(committed)
        write_part(arrow_fs, part, committed, stats)
    if store and table is not None and KV_FILE in table.column_names:
        store.remove(table.column(KV_FILE).to_pylist())
    fs.rm(fragments)
    return stats


def commit_shards(
    url: str, commits: list[tuple[str, Shard, list[str]]], store: "PayloadStore | None"
) -> list[ShardStats]:
    """Runs on a worker: `commit_shard` for each (part, shard, fragments)."""
    return [commit_shard(url, part, shard, fragments, store) for part, shard, fragments in commits]


@dataclass
class _Pending:
    shard: Shard
    seen: np.ndarray  # bool per row of the shard
    fragments: list[str]


class ShardLedger:
    """Driver side: fed the write stage's fragment rows; starts a commit task per complete shard,
    while this run holds the output's lease."""

    def __init__(self, output: OutputTarget, shards: list[Shard], store: "PayloadStore | None", lease: OutputLease):
        self.output, self.store, self.lease = output, store, lease
        self.pending = {s.index: _Pending(s, np.zeros(s.num_rows, bool), []) for s in shards}
        self.committing: dict[ray.ObjectRef, list[Shard]] = {}
        self.stats = ShardStats()
        self.late_duplicate_rows = 0
        self.output_tokens = 0  # written so far, for progress
        self.bytes_received = 0  # the fragment rows' size: what reaches the driver, per row a few dozen bytes
        # No CPU reserved, as the writers (pipeline/job/graph.py build_dataset): short I/O that must not wait
        # for the pipeline's ops to release theirs.
        self._commit = ray.remote(commit_shards).options(num_cpus=0, max_retries=3, retry_exceptions=True)

    def add(self, fragments: pa.Table) -> None:
        self.bytes_received += fragments.nbytes
        columns = fragments.select([SHARD, PATH, ROWS, OUTPUT_TOKENS]).to_pydict()
        complete = []
        for shard, path, rows, tokens in zip(*columns.values()):
            self.output_tokens += tokens
            entry = self.pending.get(shard)
            if entry is None:  # its shard is committed or being committed: a late duplicate
                self.late_duplicate_rows += len(rows)
                self.output.fs.rm(path)
                continue
            entry.seen[np.asarray(rows) - entry.shard.first_row] = True
            entry.fragments.append(path)
            if entry.seen.all():
                del self.pending[shard]
                complete.append(entry)
        if complete:
            self.lease.check()
            commits = [(self.output.part(e.shard.index), e.shard, e.fragments) for e in complete]
            self.committing[self._commit.remote(self.output.url, commits, self.store)] = [e.shard for e in complete]

    def committed(self, wait: bool = False) -> int:
        """Rows of the shards whose commit finished since the last call (all of them if `wait`)."""
        refs = list(self.committing)
        if not refs:
            return 0
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        rows = 0
        for ref, stats in zip(done, ray.get(done)):
            self.stats = sum(stats, self.stats)
            rows += sum(shard.num_rows for shard in self.committing.pop(ref))
        return rows

    def missing(self) -> list[int]:
        return sorted(self.pending)
