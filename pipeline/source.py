"""The prompt dataset, cut into shards: fixed row ranges of the input files, numbered the same
way on every run, so a rerun knows which shards a crashed run already committed.

Everything that can make the whole job fail is checked here, on the driver, before any
worker starts: the path, the Parquet files, the prompt column, empty input."""
import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from pipeline.columns import ERROR, ROW, row_error
from pipeline.config import DuplicateIds, InputConfig
from pipeline.errors import JobError
from pipeline.io import NOT_ROWS, filesystem


SHARD = "shard"


@dataclass(frozen=True)
class Shard:
    index: int
    path: str
    start: int  # rows [start, stop) of the file
    stop: int
    first_row: int  # the job-wide row number of `start`
    # Job-wide row numbers already known to be bad, with their error.
    errors: tuple[tuple[int, str], ...] = ()

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    num_rows: int


class PromptSource:
    def __init__(self, cfg: InputConfig, shard_rows: int, needs: tuple[str, ...]):
        """`needs`: the columns the job reads (the prompt, or a prefill dataset's)."""
        self.cfg = cfg
        self.fs, self.arrow_fs, root = filesystem(cfg.path)
        if not self.fs.exists(root):
            raise JobError(f"input.path {cfg.path} does not exist")
        self.files, self.schema = self._inspect(root)
        self.num_rows = sum(f.num_rows for f in self.files)
        if self.num_rows == 0:
            raise JobError(f"input.path {cfg.path} has no rows")
        for column in needs:
            if column not in self.schema.names:
                raise JobError(f"input has no column '{column}' (columns: {', '.join(self.schema.names)})")
        self.has_ids = cfg.id_column in self.schema.names
        self.shards = self._cut(shard_rows, self._bad_ids() if self.has_ids else {})

    def _inspect(self, root: str) -> tuple[list[InputFile], pa.Schema]:
        paths = sorted(
            p for p in (self.fs.find(root) if self.fs.isdir(root) else [root])
            if not p.rsplit("/", 1)[-1].startswith(NOT_ROWS)
        )  # fmt: skip
        if not paths:
            raise JobError(f"input.path {self.cfg.path} holds no files")
        files, schema = [], None
        for path in paths:
            try:
                meta = pq.read_metadata(path, filesystem=self.arrow_fs)
            except (pa.ArrowException, OSError) as error:
                raise JobError(f"input file {path} is not readable Parquet: {error}") from None
            file_schema = meta.schema.to_arrow_schema()
            if schema is not None and not file_schema.equals(schema):
                raise JobError(f"input file {path} has a different schema from {paths[0]}")
            schema = file_schema
            files.append(InputFile(path, self.fs.size(path), meta.num_rows))
        return files, schema

    def _bad_ids(self) -> dict[int, str]:
        """Job-wide row number -> error, for null ids and (by policy) repeats of an earlier id."""
        ids = pd.concat(
            [pq.read_table(f.path, columns=[self.cfg.id_column], filesystem=self.arrow_fs).column(0).to_pandas()
             for f in self.files], ignore_index=True,
        )  # fmt: skip
        bad = {int(row): row_error("null_id", "the id is null") for row in np.flatnonzero(ids.isna())}
        if self.cfg.duplicate_ids is DuplicateIds.error:
            firsts = ids.dropna().drop_duplicates()
            first_row = pd.Series(firsts.index, index=firsts.to_numpy())
            for row in np.flatnonzero((ids.duplicated() & ids.notna()).to_numpy()):
                bad[int(row)] = row_error("duplicate_id", f"id {ids[row]} is also on row {first_row[ids[row]]}")
        return bad

    def _cut(self, shard_rows: int, bad: dict[int, str]) -> list[Shard]:
        shards, first_row = [], 0
        for f in self.files:
            for start in range(0, f.num_rows, shard_rows):
                stop = min(start + shard_rows, f.num_rows)
                rows = range(first_row + start, first_row + stop)
                errors = tuple((r, bad[r]) for r in rows if r in bad) if bad else ()
                shards.append(Shard(len(shards), f.path, start, stop, first_row + start, errors))
            first_row += f.num_rows
        return shards

    def fingerprint(self) -> dict:
        """What identifies this input for resuming: the files, their sizes and row counts."""
        files = [asdict(f) for f in self.files]
        return {"files": files, "digest": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}

    def reader(self, shards: list[Shard]) -> "ShardReader":
        return ShardReader(self.arrow_fs, self.cfg.id_column, self.has_ids, {s.index: s for s in shards})


@dataclass(frozen=True)
class ShardReader:
    """Runs in Ray read tasks, fed batches of shard numbers: each shard's rows with their
    job-wide row number, id and known errors."""

    filesystem: pyarrow.fs.FileSystem
    id_column: str
    has_ids: bool
    shards: dict[int, Shard]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self.read(self.shards[i]) for i in batch.column(SHARD).to_pylist()])

    def read(self, shard: Shard) -> pa.Table:
        """Reads only the row groups that hold the shard."""
        file = pq.ParquetFile(shard.path, filesystem=self.filesystem)
        groups, offset, table_start = [], 0, None
        for i in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(i).num_rows
            if offset < shard.stop and offset + rows > shard.start:
                groups.append(i)
                table_start = offset if table_start is None else table_start
            offset += rows
        table = file.read_row_groups(groups).slice(shard.start - table_start, shard.num_rows)
        rows = np.arange(shard.first_row, shard.first_row + shard.num_rows, dtype=np.int64)
        table = table.append_column(ROW, pa.array(rows))
        if not self.has_ids:
            table = table.append_column(self.id_column, pa.array(rows))
        known = dict(shard.errors)
        errors = pa.array([known.get(int(r)) for r in rows], pa.string())
        if ERROR in table.column_names:  # a prefill dataset: its rows' errors stand
            return table.set_column(table.schema.get_field_index(ERROR), ERROR, pc.coalesce(table[ERROR], errors))
        return table.append_column(ERROR, errors)
