"""Write stage (actors that reserve no CPU): a batch's finished rows are written where they
are, as one fragment file per shard they belong to, under the output's _fragments/ folder. Only
each fragment's name and row numbers go on to the driver, which has a shard committed once its
fragments hold all of its rows (pipeline/io/commit.py)."""

import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import GENERATED_TOKENS, ROW
from pipeline.io.storage import filesystem

# What the write stage hands the driver: one row per fragment written.
SHARD, PATH, ROWS, OUTPUT_TOKENS = "shard", "path", "rows", "output_tokens"
FRAGMENT = pa.schema(
    [(SHARD, pa.int64()), (PATH, pa.string()), (ROWS, pa.list_(pa.int64())), (OUTPUT_TOKENS, pa.int64())]
)


@dataclass(frozen=True)
class WriteFragments:
    folder: str  # the output's fragments folder, an fsspec URL
    starts: np.ndarray  # first job-wide row of each shard, ascending
    shards: np.ndarray  # the shard numbers, in the same order

    def __call__(self, batch: pa.Table) -> pa.Table:
        fs, _, root = filesystem(self.folder)
        rows = batch.column(ROW).to_numpy()
        owners = np.searchsorted(self.starts, rows, side="right") - 1
        written = []
        for owner in np.unique(owners):
            piece = batch.filter(pa.array(owners == owner))
            shard = int(self.shards[owner])
            path = f"{root}/{shard:06d}/{uuid.uuid4().hex}.arrow"
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "wb") as f, pa.ipc.new_stream(f, piece.schema) as stream:
                stream.write_table(piece)
            tokens = pc.sum(pc.list_value_length(piece.column(GENERATED_TOKENS))).as_py() or 0
            written.append((shard, path, piece.column(ROW).to_numpy(), tokens))
        if not written:
            return FRAGMENT.empty_table()
        return pa.table([pa.array(column) for column in zip(*written)], schema=FRAGMENT)


def read_fragment(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all()
