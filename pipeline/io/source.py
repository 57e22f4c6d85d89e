"""The prompt dataset, cut into shards: fixed row ranges of the input files, numbered the same
way on every run, so a rerun knows which shards a crashed run already committed. The files are
Parquet, or JSONL of OpenAI Batch requests read as rows (pipeline/io/openai_requests.py).

Everything that can make the whole job fail is checked here, on the driver, before any
worker starts: the path, the files, the prompt column, empty input."""

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq
import ray

from pipeline.columns import ERROR, INTERNAL, ROW, ErrorKind, row_error
from pipeline.config import DuplicateIds, InputConfig, InputFormat
from pipeline.errors import JobError
from pipeline.io.openai_requests import CHAT, Requests, Served, first_endpoint, input_config, parse, read_lines
from pipeline.io.prefix_order import order_by_prefix
from pipeline.io.storage import NOT_ROWS, filesystem

UNIT = "unit"
# Rows decoded at a time, and about as many bytes at most: a row group of any size is
# streamed, not held whole.
_READ_ROWS = 8192
_READ_BYTES = 64 << 20


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
    row_groups: tuple[int, ...]  # rows in each row group
    # What changes when the file is rewritten, even at the same size: the store's version
    # (ETag, modification time) and a digest of the Parquet footer (its column statistics).
    version: str
    footer: str


@dataclass(frozen=True)
class ReadUnit:
    """Shards of one file read by one task, so that every row group they touch is decoded once
    however many shards it holds (a 1M-row group read per 1000-row shard is read 1000 times)."""

    path: str
    groups: tuple[int, ...]
    start: int  # the file row where the first of `groups` starts
    shards: tuple[Shard, ...]


def check_columns(schema: pa.Schema, needs: tuple[str, ...], reserved: tuple[str, ...]) -> None:
    """`needs`: the columns the job reads (the prompt, or a prefill dataset's); `reserved`:
    names the job writes, which an input column must not have."""
    for column in needs:
        if column not in schema.names:
            raise JobError(f"input has no column '{column}' (columns: {', '.join(schema.names)})")
    clashes = [c for c in schema.names if c in reserved or c.startswith(INTERNAL)]
    if clashes:
        raise JobError(
            f"input column(s) {', '.join(clashes)} would clash with the job's own columns; rename them in the "
            "input (or pick another input.id_column)"
        )


@dataclass(frozen=True)
class RequestFormat:
    """How OpenAI Batch files are read as rows: every file's requests go to one endpoint, and
    name what the job serves."""

    endpoint: str
    served: Served

    def read(self, fs, path: str) -> Requests:
        return parse(read_lines(fs, path), self.endpoint, self.served)


class PromptSource:
    def __init__(
        self,
        cfg: InputConfig,
        shard_rows: int,
        needs: tuple[str, ...],
        reserved: tuple[str, ...] = (),
        served: Served | None = None,
    ):
        """`served`: what an OpenAI Batch request's body.model may name. For those files `cfg`
        becomes the columns their rows have (`self.cfg`), which the job then reads."""
        self.cfg = cfg
        self.fs, self.arrow_fs, self.root = filesystem(cfg.path)
        if not self.fs.exists(self.root):
            raise JobError(f"input.path {cfg.path} does not exist")
        self.requests: RequestFormat | None = None
        self._tables: dict[str, Requests] = {}  # OpenAI Batch files, read once on the driver
        self.files, read_schema = self._inspect(self.root, served)
        if self.requests:
            self.cfg = input_config(cfg, self.requests.endpoint)
            needs = (self.cfg.source_column,)
        self.schema = without_views(read_schema)  # what every stage sees
        self.num_rows = sum(f.num_rows for f in self.files)
        if self.num_rows == 0:
            raise JobError(f"input.path {cfg.path} has no rows")
        check_columns(self.schema, needs, reserved)
        self.has_ids = self.cfg.id_column in self.schema.names
        self.shards = self._cut(shard_rows, {**(self._bad_ids() if self.has_ids else {}), **self._bad_requests()})

    @cached_property
    def sample(self) -> pa.RecordBatch:
        """Up to 1,024 of the first rows of the first file that has any, decoded: what sizes are
        estimated from before the job runs. Fewer where rows are large (a prefill dataset's KV)."""
        first = next(f for f in self.files if f.num_rows)
        if self.requests:
            return self._tables[first.path].table.slice(0, 1024).combine_chunks().to_batches()[0]
        file = pq.ParquetFile(first.path, filesystem=self.arrow_fs)
        group = file.metadata.row_group(0)
        rows = max(1, min(1024, _READ_BYTES * group.num_rows // max(group.total_byte_size, 1)))
        return next(file.iter_batches(rows))

    def bytes_per_row(self) -> float:
        """A row's mean size in memory, every column, over the sample."""
        return self.sample.nbytes / self.sample.num_rows

    def prompt_bytes(self, column: str) -> tuple[float, float]:
        """Over the sample: a prompt's mean size in memory, and the share of rows that have one
        (not null)."""
        sampled = self.sample.column(column)
        prompts = sampled.drop_null()
        return prompts.nbytes / max(len(prompts), 1), len(prompts) / len(sampled)

    def values(self, column: str) -> pa.ChunkedArray:
        """One column, or one field of a struct column (`column.field`), of every input file,
        read alone."""
        tables = [self._read_column(f.path, column) for f in self.files]
        return pa.chunked_array([chunk for t in tables for chunk in t.column(0).chunks], tables[0].schema.field(0).type)

    def request_tables(self) -> list[pa.Table]:
        """OpenAI Batch files' rows, file by file, as the driver read them."""
        return [self._tables[f.path].table for f in self.files]

    def _read_column(self, path: str, column: str) -> pa.Table:
        if self.requests:
            return self._tables[path].table.select([column])
        return pq.read_table(path, columns=[column], filesystem=self.arrow_fs)

    def _inspect(self, root: str, served: Served | None) -> tuple[list[InputFile], pa.Schema]:
        if self.fs.isdir(root):
            # Hidden and underscore entries at any depth are not data (.ipynb_checkpoints/, _tmp/,
            # _SUCCESS), as Spark and pyarrow read a directory.
            found = self.fs.find(root)
            paths = sorted(p for p in found if not _skipped(p.removeprefix(root).strip("/").split("/")))
        else:
            paths = [root]
        if not paths:
            raise JobError(f"input.path {self.cfg.path} holds no files")
        if self.cfg.format is InputFormat.openai_batch:
            if served is None:
                raise ValueError("OpenAI Batch input needs the models the job serves")
            return self._inspect_requests(paths, served)
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
            info = self.fs.info(path)
            footer = pa.BufferOutputStream()
            meta.write_metadata_file(footer)  # the footer's bytes: schema, row groups, column statistics
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            digest = hashlib.sha256(footer.getvalue()).hexdigest()[:16]
            files.append(InputFile(path, info["size"], meta.num_rows, groups, _version(info), digest))
        return files, schema

    def _inspect_requests(self, paths: list[str], served: Served) -> tuple[list[InputFile], pa.Schema]:
        """OpenAI Batch files, each read whole: a file's rows are its lines, one "row group"
        (a file is read by one task), identified by a digest of its text."""
        lines = {path: read_lines(self.fs, path) for path in paths}
        endpoint = next(filter(None, map(first_endpoint, lines.values())), CHAT)
        self.requests = RequestFormat(endpoint, served)
        files = []
        for path, text in lines.items():
            self._tables[path] = parse(text, endpoint, served)
            digest = hashlib.sha256("".join(text).encode()).hexdigest()[:16]
            info = self.fs.info(path)
            files.append(InputFile(path, info["size"], len(text), (len(text),), _version(info), digest))
        return files, self._tables[paths[0]].table.schema

    def _bad_requests(self) -> dict[int, str]:
        """Job-wide row number -> error, for the lines of OpenAI Batch files that cannot run."""
        bad, first_row = {}, 0
        for f in self.files:
            if f.path in self._tables:
                bad.update({first_row + row: error for row, error in self._tables[f.path].errors.items()})
            first_row += f.num_rows
        return bad

    def _bad_ids(self) -> dict[int, str]:
        """Job-wide row number -> error, for null ids and (by policy) repeats of an earlier id."""
        ids = pd.concat(
            [self._read_column(f.path, self.cfg.id_column).column(0).to_pandas() for f in self.files],
            ignore_index=True,
        )
        bad = {int(row): row_error(ErrorKind.null_id, "the id is null") for row in np.flatnonzero(ids.isna())}
        if self.cfg.duplicate_ids is DuplicateIds.error:
            firsts = ids.dropna().drop_duplicates()
            first_row = pd.Series(firsts.index, index=firsts.to_numpy())
            for row in np.flatnonzero((ids.duplicated() & ids.notna()).to_numpy()):
                bad[int(row)] = row_error(ErrorKind.duplicate_id, f"id {ids[row]} is also on row {first_row[ids[row]]}")
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
        """What identifies this input for resuming: the files, their sizes, row counts, versions
        and footers."""
        files = [{k: v for k, v in asdict(f).items() if k != "row_groups"} for f in self.files]
        return {"files": files, "digest": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]}

    def units(self, shards: list[Shard]) -> list[ReadUnit]:
        """`shards` (in input order) grouped so that shards sharing a row group are read together."""
        groups = {f.path: np.cumsum((0,) + f.row_groups) for f in self.files}  # each group's first row
        units: list[ReadUnit] = []
        for shard in shards:
            bounds = groups[shard.path]
            first = int(np.searchsorted(bounds, shard.start, side="right")) - 1
            last = int(np.searchsorted(bounds, shard.stop, side="left")) - 1
            unit = units[-1] if units else None
            if unit and unit.path == shard.path and first <= unit.groups[-1]:
                groups_ = unit.groups + tuple(range(unit.groups[-1] + 1, last + 1))
                units[-1] = ReadUnit(unit.path, groups_, unit.start, unit.shards + (shard,))
            else:
                units.append(ReadUnit(shard.path, tuple(range(first, last + 1)), int(bounds[first]), (shard,)))
        return units

    def reader(self, shards: list[Shard], sink_name: str | None = None, order_by: str | None = None) -> "ShardReader":
        units = self.units(shards)
        return ShardReader(
            self.arrow_fs,
            self.cfg.id_column,
            self.has_ids,
            dict(enumerate(units)),
            self.schema,
            sink_name,
            order_by,
            self.requests,
        )


def _version(info: dict) -> str:
    """What changes when a file is rewritten, even at the same size: its store's ETag, else its
    modification time."""
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")


def _skipped(parts: list[str]) -> bool:
    return any(part.startswith(NOT_ROWS) for part in parts)


def without_views(schema: pa.Schema) -> pa.Schema:
    """The schema with Arrow's view types (string_view, binary_view: Polars and DuckDB write
    them) as the large types that hold the same values: pyarrow cannot yet take, sort or
    concatenate views, which the pipeline does with every column it carries."""
    return pa.schema([f.with_type(_plain(f.type)) for f in schema], metadata=schema.metadata)


def _plain(kind: pa.DataType) -> pa.DataType:
    if kind == pa.string_view():
        return pa.large_string()
    if kind == pa.binary_view():
        return pa.large_binary()
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_plain(f.type)) for f in kind])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_plain(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_plain(kind.value_type)))
    if pa.types.is_map(kind):
        return pa.map_(
            kind.key_field.with_type(_plain(kind.key_type)), kind.item_field.with_type(_plain(kind.item_type))
        )
    return kind


@dataclass(frozen=True)
class ShardReader:
    """Runs in Ray read tasks, fed batches of read-unit numbers: each shard's rows with their
    job-wide row number, id and known errors, one table per shard, ordered by the prompts of
    column `order_by` if given (pipeline/io/prefix_order.py)."""

    filesystem: pyarrow.fs.FileSystem
    id_column: str
    has_ids: bool
    units: dict[int, ReadUnit]
    schema: pa.Schema  # the rows' types as every stage sees them (`without_views`)
    sink_name: str | None = None  # where to count the rows decoded
    order_by: str | None = None
    requests: RequestFormat | None = None  # OpenAI Batch files, not Parquet

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for i in batch.column(UNIT).to_pylist():
            unit = self.units[i]
            yield from self.read_requests(unit) if self.requests else self.read(unit)

    def read_requests(self, unit: ReadUnit) -> Iterator[pa.Table]:
        """An OpenAI Batch file's lines as rows, shard by shard."""
        fs = self.filesystem.handler.fs
        table = self.requests.read(fs, unit.path).table
        for shard in unit.shards:
            yield self._rows(shard, table.slice(shard.start, shard.num_rows))
        if self.sink_name:
            ray.get_actor(self.sink_name).count.remote("input_rows_decoded", table.num_rows)

    def read(self, unit: ReadUnit) -> Iterator[pa.Table]:
        """Decodes the unit's row groups once, in order, stopping after its last shard."""
        file = pq.ParquetFile(unit.path, filesystem=self.filesystem)
        shards = iter(unit.shards)
        shard, pieces, offset = next(shards), [], unit.start
        groups = [file.metadata.row_group(g) for g in unit.groups]
        size, rows = sum(g.total_byte_size for g in groups), sum(g.num_rows for g in groups)
        batch_rows = max(1, min(_READ_ROWS, _READ_BYTES * rows // max(size, 1)))  # rows of KV are megabytes
        for batch in file.iter_batches(batch_size=batch_rows, row_groups=list(unit.groups)):
            end = offset + batch.num_rows
            while shard is not None and shard.start < end:
                lo, hi = max(shard.start, offset), min(shard.stop, end)
                if hi > lo:
                    pieces.append(batch.slice(lo - offset, hi - lo))
                if shard.stop > end:
                    break
                yield self._rows(shard, pa.Table.from_batches(pieces, file.schema_arrow))
                shard, pieces = next(shards, None), []
            offset = end
            if shard is None:
                break
        if self.sink_name:
            ray.get_actor(self.sink_name).count.remote("input_rows_decoded", offset - unit.start)

    def _rows(self, shard: Shard, table: pa.Table) -> pa.Table:
        if table.schema != self.schema:
            table = table.cast(self.schema)
        rows = np.arange(shard.first_row, shard.first_row + shard.num_rows, dtype=np.int64)
        table = table.append_column(ROW, pa.array(rows))
        if not self.has_ids:
            table = table.append_column(self.id_column, pa.array(rows))
        known = dict(shard.errors)
        errors = pa.array([known.get(int(r)) for r in rows], pa.string()) if known else pa.nulls(len(rows), pa.string())
        if ERROR in table.column_names:  # a prefill dataset: its rows' errors stand
            table = table.set_column(table.schema.get_field_index(ERROR), ERROR, pc.coalesce(table[ERROR], errors))
        else:
            table = table.append_column(ERROR, errors)
        return order_by_prefix(table, self.order_by) if self.order_by else table
