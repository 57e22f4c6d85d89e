"""Storage: any fsspec URL, for both fsspec and pyarrow, and reading a job's output back."""

import uuid

import fsspec
import pyarrow as pa
import pyarrow.dataset
import pyarrow.fs

METRICS = "_metrics.json"
IN_FLIGHT = "_tmp."  # a file written aside, moved into place once whole
REPORT = "_report.md"
REPORT_PLOT = "_report.png"
# output.format=openai_batch: the results as OpenAI's Batch API gives them (pipeline/io/openai_results.py).
BATCH_OUTPUT = "_batch_output.jsonl"
BATCH_ERRORS = "_batch_errors.jsonl"
# Name prefixes never read as rows: hidden and underscore files, and what a job writes beside its rows
# (so a job's output, e.g. a prefill dataset, reads back as an input).
NOT_ROWS = (".", "_", METRICS, REPORT, REPORT_PLOT)


def aside(path: str) -> str:
    """Where to write the file at `path` before moving it into place: beside it, under a name
    no reader takes for it."""
    directory, name = path.rsplit("/", 1)
    return f"{directory}/{IN_FLIGHT}{uuid.uuid4().hex}.{name}"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, pyarrow.fs.FileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def parquet_dataset(url: str) -> pyarrow.dataset.Dataset:
    """A Parquet file or directory, such as a finished job's rows (the files beside
    _metrics.json, the report and _SUCCESS)."""
    _, arrow_fs, root = filesystem(url)
    return pyarrow.dataset.dataset(
        root,
        filesystem=arrow_fs,
        format="parquet",
        exclude_invalid_files=False,
        partitioning=None,
        ignore_prefixes=list(NOT_ROWS),
    )


def read_output(url: str, columns: list[str] | None = None) -> pa.Table:
    """A finished job's rows."""
    return parquet_dataset(url).to_table(columns=columns)
