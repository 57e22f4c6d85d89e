"""Storage: any fsspec URL, for both fsspec and pyarrow, and reading a job's output back."""
import fsspec
import pyarrow as pa
import pyarrow.dataset
import pyarrow.fs

METRICS = "metrics.json"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, pyarrow.fs.FileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def read_output(url: str, columns: list[str] | None = None) -> pa.Table:
    """A finished job's rows (the Parquet files beside metrics.json and _SUCCESS)."""
    _, arrow_fs, root = filesystem(url)
    files = pyarrow.dataset.dataset(root, filesystem=arrow_fs, format="parquet", exclude_invalid_files=False,
                                    partitioning=None, ignore_prefixes=[".", "_", METRICS])  # fmt: skip
    return files.to_table(columns=columns)
