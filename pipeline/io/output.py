"""The output directory: one Parquet file per input shard, each committed whole (written aside,
then moved into place) by a worker once its rows are all written, so a crash leaves only
complete shards behind and a rerun of the same job finishes the rest. A manifest names the job
that owns the directory; a lease names the run that holds it now; _metrics.json, the report and
the _SUCCESS marker are written last.

    out/_kvrelay_job.json   the job's identity (input files, model, sampling, shard size)
    out/_kvrelay_lease.json the run writing here now (pipeline/io/lease.py)
    out/_fragments/         rows written by the workers, until their shard is committed
    out/part-000000.parquet ...
    out/_report.md           for a person: pools, bottleneck, errors, KV; and the plot beside it,
    out/_report.png          rows through each stage and output tokens/s over time
    out/_metrics.json
    out/_SUCCESS

Everything is checked before anything is written (`inspect`); `claim` then takes the lease
and clears what a crashed or overwritten run of a kvrelay job left. Overwriting removes only
files a kvrelay job writes, never anything else under the path.
"""

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.columns import ERROR, GENERATED_TOKENS, NUM_INPUT_TOKENS, error_kinds, generated_token_count
from pipeline.config import OutputConfig
from pipeline.errors import JobError
from pipeline.io.lease import LEASE, OutputLease
from pipeline.io.storage import BATCH_ERRORS, BATCH_OUTPUT, IN_FLIGHT, METRICS, REPORT, REPORT_PLOT, aside, filesystem

log = logging.getLogger(__name__)

MANIFEST = "_kvrelay_job.json"
SUCCESS = "_SUCCESS"
FRAGMENTS = "_fragments"
STATS_KEY = b"kvrelay.shard"  # a part's counts, in its Parquet footer
_GROUP_BYTES = 128 << 20
_PART = re.compile(r"part-(\d{6,})\.parquet")
# What a kvrelay job writes at the top of its output, besides its parts.
# With the names earlier versions gave the metrics and the report, before every name that is not
# a part took a leading "_": a rerun clears them, so that Parquet readers open the directory.
_OWN = (
    *(MANIFEST, LEASE, FRAGMENTS, SUCCESS, METRICS, REPORT, REPORT_PLOT, BATCH_OUTPUT, BATCH_ERRORS),
    *("metrics.json", "report.md", "report.png"),
)


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def shard_of(part: str) -> int | None:
    """The shard a committed file holds (the inverse of part_name); None for any other name."""
    match = _PART.fullmatch(part)
    return int(match.group(1)) if match else None


@dataclass
class ShardStats:
    """Counts of one committed shard: written into its part's footer, so a rerun's totals
    cover the shards an earlier run committed without reading their rows."""

    rows: int = 0
    rows_errored: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def of(cls, table: pa.Table) -> "ShardStats":
        return cls(
            rows=table.num_rows,
            rows_errored=table.num_rows - table.column(ERROR).null_count,
            errors=error_kinds(table.column(ERROR)),
            input_tokens=int(pc.sum(table.column(NUM_INPUT_TOKENS)).as_py() or 0),
            output_tokens=generated_token_count(table.column(GENERATED_TOKENS)),
        )

    def __add__(self, other: "ShardStats") -> "ShardStats":
        errors = Counter(self.errors)
        errors.update(other.errors)
        return ShardStats(
            self.rows + other.rows,
            self.rows_errored + other.rows_errored,
            dict(errors),
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
        )


class OutputTarget:
    def __init__(self, cfg: OutputConfig, job: dict):
        self.url = cfg.path
        self.overwrite = cfg.overwrite
        self.job = job
        self.fs, self.arrow_fs, self.root = filesystem(cfg.path)
        self._names: dict[str, str] = {}
        self.resumed = ShardStats()  # the counts of the shards an earlier run committed

    def inspect(self) -> set[int]:
        """Checks the directory may take this job, touching nothing; returns the shards already
        committed to it by an earlier run of the same job (none when it will be overwritten)."""
        self.fs.invalidate_cache()  # workers and other runs write here: a cached listing (s3fs) is stale
        listing = self.fs.ls(self.root, detail=False) if self.fs.isdir(self.root) else []
        self._names = {name: p for p in listing if (name := p.rstrip("/").rsplit("/", 1)[-1]) != LEASE}
        if not self._names:
            return set()
        if MANIFEST not in self._names:
            raise JobError(
                f"output.path {self.url} holds other data, not a kvrelay job's output; use an empty path "
                "(output.overwrite=true replaces only a kvrelay job's output)"
            )
        strays = [n for n in self._names if n.startswith("part-") and shard_of(n) is None]
        if strays:
            raise JobError(
                f"output.path {self.url} holds {', '.join(sorted(strays))}, which no kvrelay job writes; "
                "move it away and rerun"
            )
        if self.overwrite:
            return set()
        try:
            with self.fs.open(self._names[MANIFEST]) as f:
                owner = json.load(f)
        except ValueError:
            raise JobError(f"output.path {self.url} has a damaged {MANIFEST}; use output.overwrite=true") from None
        if owner != self.job:
            changed = ", ".join(k for k in self.job if owner.get(k) != self.job[k]) or "format"
            raise JobError(
                f"output.path {self.url} holds the output of a different job (differs in: {changed}); "
                "use another path or output.overwrite=true"
            )
        done = {s for s in map(shard_of, self._names) if s is not None}
        self.resumed = self.stats(done)  # reads every committed part's footer: a damaged one stops here
        if done:
            log.info("resuming %s: %d shards already committed", self.url, len(done))
        return done

    def claim(self) -> tuple[OutputLease, set[int]]:
        """Takes the directory for this run (a second run stops here) and clears what an earlier
        run left: with overwrite, all a kvrelay job writes; otherwise what was in flight and the
        files written after the rows. Returns the lease, held until the caller exits it, and the
        shards committed already."""
        lease = OutputLease(self.fs, self.root, self.url).acquire()
        try:
            done = self.inspect()  # again, now that no other run can change the directory
            for name, path in self._names.items():
                resumable = name == MANIFEST or shard_of(name) is not None
                if _written_by_kvrelay(name) and (self.overwrite or not resumable):
                    self.fs.rm(path, recursive=True)
            left = [n for n in self._names if not _written_by_kvrelay(n)]
            if left:
                log.warning(
                    "output.path %s also holds files kvrelay did not write, left as they are: %s",
                    self.url,
                    ", ".join(sorted(left)),
                )
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(f"{self.root}/{MANIFEST}", "w") as f:
                json.dump(self.job, f, indent=2)
        except BaseException:
            lease.release()
            raise
        return lease, done

    @property
    def location(self) -> str:
        """The output's URL as its filesystem resolves it (a relative local path made whole)."""
        return self.fs.unstrip_protocol(self.root)

    def part(self, shard: int) -> str:
        return f"{self.root}/{part_name(shard)}"

    def stats(self, shards: set[int]) -> ShardStats:
        """The counts of committed shards, read from their parts' footers."""
        total = ShardStats()
        for shard in sorted(shards):
            total += read_stats(self.arrow_fs, self.part(shard))
        return total

    def fragments(self) -> str:
        return f"{self.root}/{FRAGMENTS}"

    def finish(self, metrics_json: str) -> None:
        self.fs.invalidate_cache()
        if self.fs.exists(self.fragments()):  # late duplicates, a killed writer's leftovers
            self.fs.rm(self.fragments(), recursive=True)
        with self.fs.open(f"{self.root}/{METRICS}", "w") as f:
            f.write(metrics_json)
        with self.fs.open(f"{self.root}/{SUCCESS}", "w"):
            pass


def _written_by_kvrelay(name: str) -> bool:
    """A name a kvrelay job writes at the top of its output."""
    return name in _OWN or name.startswith(IN_FLIGHT) or shard_of(name) is not None


def write_part(arrow_fs, path: str, table: pa.Table, stats: ShardStats) -> None:
    """Writes a shard's rows aside, then moves them into place: a reader never sees half a part."""
    written = aside(path)
    metadata = {**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats.__dict__).encode()}
    # Row groups of about _GROUP_BYTES, not one per part: a part of KV payloads (a prefill
    # dataset) is gigabytes, and readers decode a row group whole.
    group_rows = max(1, _GROUP_BYTES * table.num_rows // max(table.nbytes, 1))
    pq.write_table(table.replace_schema_metadata(metadata), written, filesystem=arrow_fs, row_group_size=group_rows)
    arrow_fs.move(written, path)


def read_stats(arrow_fs, path: str) -> ShardStats:
    try:
        metadata = pq.read_metadata(path, filesystem=arrow_fs).metadata or {}
    except (pa.ArrowException, OSError) as error:
        raise JobError(f"{path} is damaged ({error}); remove it and rerun to compute its shard again") from None
    if STATS_KEY not in metadata:
        raise JobError(f"{path} is not a part kvrelay committed (its footer has no counts); remove it and rerun")
    return ShardStats(**json.loads(metadata[STATS_KEY]))
