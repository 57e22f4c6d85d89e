"""The output directory: one Parquet file per input shard, each committed whole (written aside,
then moved into place), so a crash leaves only complete shards behind and a rerun of the same
job finishes the rest. A manifest names the job that owns the directory; metrics.json, the
report and the _SUCCESS marker are written last.

    out/_kvrelay_job.json   the job's identity (input files, model, sampling, shard size)
    out/part-000000.parquet ...
    out/report.md           for a person: pools, bottleneck, errors, KV; and the plot beside it,
    out/report.png          rows through each stage and output tokens/s over time
    out/metrics.json
    out/_SUCCESS
"""
import json
import logging
import uuid
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.columns import ERROR, GENERATED_TOKENS, INTERNAL, NUM_INPUT_TOKENS, ROW, error_kinds
from pipeline.config import OutputConfig
from pipeline.errors import JobError
from pipeline.io import METRICS, REPORT, REPORT_PLOT, filesystem, read_output
from pipeline.source import Shard

log = logging.getLogger(__name__)

MANIFEST = "_kvrelay_job.json"
SUCCESS = "_SUCCESS"
_IN_FLIGHT = "_tmp."


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def shard_of(part: str) -> int:
    """The shard a committed file holds: the inverse of part_name."""
    return int(part.removeprefix("part-").removesuffix(".parquet"))


class OutputTarget:
    def __init__(self, cfg: OutputConfig, job: dict):
        self.url = cfg.path
        self.overwrite = cfg.overwrite
        self.job = job
        self.fs, self.arrow_fs, self.root = filesystem(cfg.path)

    def prepare(self) -> set[int]:
        """Claims the directory for this job; returns the shards already committed to it by an
        earlier run of the same job."""
        names = {p.rsplit("/", 1)[-1]: p for p in self.fs.ls(self.root)} if self.fs.isdir(self.root) else {}
        if names and self.overwrite:
            self.fs.rm(self.root, recursive=True)
            names = {}
        if not names:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(f"{self.root}/{MANIFEST}", "w") as f:
                json.dump(self.job, f, indent=2)
            return set()
        if MANIFEST not in names:
            raise JobError(f"output.path {self.url} holds other data; use an empty path or output.overwrite=true")
        with self.fs.open(names[MANIFEST]) as f:
            owner = json.load(f)
        if owner != self.job:
            changed = ", ".join(k for k in self.job if owner.get(k) != self.job[k])
            raise JobError(
                f"output.path {self.url} holds the output of a different job (differs in: {changed}); "
                "use another path or output.overwrite=true"
            )
        for name, path in names.items():
            if name.startswith(_IN_FLIGHT) or name in (SUCCESS, METRICS, REPORT, REPORT_PLOT):
                self.fs.rm(path)
        done = {shard_of(n) for n in names if n.startswith("part-")}
        if done:
            log.info("resuming %s: %d shards already committed", self.url, len(done))
        return done

    def commit(self, shard: int, table: pa.Table) -> None:
        final = f"{self.root}/{part_name(shard)}"
        aside = f"{self.root}/{_IN_FLIGHT}{uuid.uuid4().hex}.{part_name(shard)}"
        with self.fs.open(aside, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(aside, final)

    def count(self) -> dict:
        """Rows, tokens and errors by kind, read back from the committed output itself."""
        table = read_output(self.url, [ERROR, NUM_INPUT_TOKENS, GENERATED_TOKENS])
        return {
            "rows_out": table.num_rows,
            "rows_errored": table.num_rows - table.column(ERROR).null_count,
            "errors": error_kinds(table.column(ERROR)),
            "input_tokens": int(pc.sum(table.column(NUM_INPUT_TOKENS)).as_py() or 0),
            "output_tokens": int(pc.sum(pc.list_value_length(table.column(GENERATED_TOKENS))).as_py() or 0),
        }

    def finish(self, metrics: dict) -> None:
        with self.fs.open(f"{self.root}/{METRICS}", "w") as f:
            json.dump(metrics, f, indent=2)
        with self.fs.open(f"{self.root}/{SUCCESS}", "w"):
            pass


class ShardCommitter:
    """Collects the pipeline's rows per shard, in whatever order they arrive, and commits a
    shard once every one of its rows is in: each row exactly once, in input order."""

    def __init__(self, output: OutputTarget, shards: list[Shard], on_commit: Callable[[pa.Table], None] | None = None):
        self.output = output
        self.on_commit = on_commit  # called with each committed shard's rows, internal columns included
        self.shards = {s.first_row: s for s in shards}
        self.starts = np.array(sorted(self.shards), dtype=np.int64)
        self.pending: dict[int, list[pa.Table]] = {}

    def add(self, batch: pa.Table) -> int:
        """Buffers a batch; returns the rows committed by it."""
        rows = batch.column(ROW).to_numpy()
        owners = self.starts[np.searchsorted(self.starts, rows, side="right") - 1]
        committed = 0
        for start in np.unique(owners):
            self.pending.setdefault(int(start), []).append(batch.filter(pa.array(owners == start)))
            committed += self._commit_if_complete(self.shards[int(start)])
        return committed

    def _commit_if_complete(self, shard: Shard) -> int:
        table = pa.concat_tables(self.pending[shard.first_row])
        rows, first = np.unique(table.column(ROW).to_numpy(), return_index=True)
        if len(rows) < shard.num_rows:
            return 0
        # A batch redone after a worker died may arrive twice; keep one copy of each row.
        table = table.take(pa.array(first))
        self.output.commit(shard.index, table.drop_columns([c for c in table.column_names if c.startswith(INTERNAL)]))
        if self.on_commit:
            self.on_commit(table)
        del self.pending[shard.first_row]
        return shard.num_rows

    def check_complete(self) -> None:
        if self.pending:
            missing = sorted(self.shards[s].index for s in self.pending)
            raise JobError(f"the pipeline ended without every row of shards {missing}; rerun to finish them")
