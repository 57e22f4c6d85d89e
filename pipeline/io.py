"""Parquet in and out on any fsspec URL: the prompt dataset, the output contract, metrics.json,
and the _SUCCESS marker written last."""
import json

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.fs
import ray.data

from pipeline.columns import ERROR, NUM_GENERATED_TOKENS, NUM_INPUT_TOKENS
from pipeline.config import InputConfig, OutputConfig
from pipeline.errors import JobError

SUCCESS = "_SUCCESS"
METRICS = "metrics.json"


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, pyarrow.fs.FileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


class PromptSource:
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        fs, self.arrow_fs, self.path = _filesystem(cfg.path)
        if not fs.exists(self.path):
            raise JobError(f"input.path {cfg.path} does not exist")

    def read(self, num_cpus: float) -> tuple[ray.data.Dataset, list[str]]:
        """The prompt dataset with an id column (a deterministic per-row hash when the input
        has none), and the input's column names."""
        read = dict(filesystem=self.arrow_fs, num_cpus=num_cpus)
        ds = ray.data.read_parquet(self.path, **read)
        columns = list(ds.schema().names)
        if self.cfg.prompt_column not in columns:
            raise JobError(f"input has no column '{self.cfg.prompt_column}' (columns: {', '.join(columns)})")
        if self.cfg.id_column not in columns:
            ds = ray.data.read_parquet(self.path, include_row_hash=True, **read)
            ds = ds.rename_columns({"row_hash": self.cfg.id_column})
        return ds, columns


def parquet_dataset(url: str) -> pyarrow.dataset.Dataset:
    """A Parquet file or directory, such as a finished job's rows (the files beside
    metrics.json and _SUCCESS)."""
    _, arrow_fs, root = _filesystem(url)
    return pyarrow.dataset.dataset(root, filesystem=arrow_fs, format="parquet", exclude_invalid_files=False,
                                   partitioning=None, ignore_prefixes=[".", "_", METRICS])  # fmt: skip


def read_output(url: str, columns: list[str] | None = None) -> pa.Table:
    """A finished job's rows."""
    return parquet_dataset(url).to_table(columns=columns)


class OutputTarget:
    def __init__(self, cfg: OutputConfig):
        self.url = cfg.path
        self.overwrite = cfg.overwrite
        self.fs, self.arrow_fs, self.root = _filesystem(cfg.path)

    def prepare(self) -> None:
        """Refuse to mix with existing data unless asked to replace it."""
        if self.fs.exists(self.root) and self.fs.ls(self.root):
            if not self.overwrite:
                raise JobError(f"output.path {self.url} is not empty; set output.overwrite=true to replace it")
            self.fs.rm(self.root, recursive=True)
        self.fs.makedirs(self.root, exist_ok=True)

    def write(self, ds: ray.data.Dataset, num_cpus: float) -> None:
        ds.write_parquet(self.root, filesystem=self.arrow_fs, ray_remote_args={"num_cpus": num_cpus})

    def count(self) -> dict[str, int]:
        """Rows and tokens as written, read back from the output itself."""
        table = read_output(self.url, [ERROR, NUM_INPUT_TOKENS, NUM_GENERATED_TOKENS])
        return {
            "rows_out": table.num_rows,
            "rows_errored": table.num_rows - table.column(ERROR).null_count,
            "input_tokens": int(pc.sum(table.column(NUM_INPUT_TOKENS)).as_py() or 0),
            "output_tokens": int(pc.sum(table.column(NUM_GENERATED_TOKENS)).as_py() or 0),
        }

    def finish(self, metrics: dict) -> None:
        with self.fs.open(f"{self.root}/{METRICS}", "w") as f:
            json.dump(metrics, f, indent=2)
        with self.fs.open(f"{self.root}/{SUCCESS}", "w"):
            pass
