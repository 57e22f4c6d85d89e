"""What reading and writing OpenAI Batch files costs against Parquet, on the same rows: the
input read as a job reads it (the driver's checks, then every shard through the read tasks'
reader), and the results written as a finished job writes them (a committed part; the two JSONL
files from it). Rows a second, side by side in one run: the machine's noise is shared."""

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench.sample import make_prompt
from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    FINISH_REASON,
    GENERATED_TEXT,
    GENERATED_TOKENS,
    ID,
    NUM_GENERATED_TOKENS,
    NUM_INPUT_TOKENS,
    TOKEN_LIST,
)
from pipeline.config import InputConfig, InputFormat, OutputConfig
from pipeline.io.openai_requests import CHAT, MESSAGES, Served
from pipeline.io.openai_requests import ID as REQUEST_ID
from pipeline.io.openai_results import ResultFormat, write_results
from pipeline.io.output import OutputTarget, ShardStats, write_part
from pipeline.io.source import PromptSource

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Rates:
    read_parquet: float  # rows/s
    read_openai: float
    write_parquet: float
    write_openai: float

    def lines(self, rows: int) -> list[str]:
        return [
            f"{rows} requests, rows/s (best of the rounds)",
            f"  read   Parquet {self.read_parquet:>10,.0f}   OpenAI Batch {self.read_openai:>10,.0f}   "
            f"{self.read_openai / self.read_parquet:.2f}x",
            f"  write  Parquet {self.write_parquet:>10,.0f}   OpenAI Batch {self.write_openai:>10,.0f}   "
            f"{self.write_openai / self.write_parquet:.2f}x",
        ]


def batch_files_bench(folder: Path, rows: int, rounds: int) -> Rates:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prompts = [make_prompt(rng) for _ in range(rows)]
    requests, parquet = folder / "requests.jsonl", folder / "requests.parquet"
    with requests.open("w") as f:
        for i, prompt in enumerate(prompts):
            body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": body}) + "\n")
    turns = [[{"role": "user", "content": p}] for p in prompts]
    pq.write_table(pa.table({REQUEST_ID: [f"r{i}" for i in range(rows)], MESSAGES: turns}), parquet)
    parquet_input = InputConfig(path=str(parquet), messages_column=MESSAGES)
    openai_input = InputConfig(path=str(requests), format=InputFormat.openai_batch)
    output = OutputTarget(OutputConfig(path=str(folder / "out")), {})
    output.fs.makedirs(output.root, exist_ok=True)
    table = completions(rows)
    form = ResultFormat(chat=True, model=MODEL, created=0, job="bench")
    best = [
        min(seconds)
        for seconds in zip(
            *(
                (
                    timed(lambda: read_all(parquet_input)),
                    timed(lambda: read_all(openai_input)),
                    timed(lambda: write_part(output.arrow_fs, output.part(0), table, ShardStats.of(table))),
                    timed(lambda: write_results(output, [0], form)),
                )
                for _ in range(rounds)
            )
        )
    ]
    return Rates(*(rows / s for s in best))


def read_all(cfg: InputConfig) -> int:
    source = PromptSource(cfg, 1000, (MESSAGES,), served=Served(MODEL))
    reader = source.reader(source.shards)
    return sum(t.num_rows for i in reader.units for t in reader(pa.table({"unit": [i]})))


def completions(rows: int) -> pa.Table:
    """A committed part's rows: completions of 64 tokens."""
    text = "The quick brown fox jumps over the lazy dog. " * 6
    return pa.table(
        {
            ID: [f"r{i}" for i in range(rows)],
            GENERATED_TEXT: [text] * rows,
            GENERATED_TOKENS: pa.array([list(range(64))] * rows, TOKEN_LIST),
            NUM_INPUT_TOKENS: pa.array([40] * rows, pa.int32()),
            NUM_GENERATED_TOKENS: pa.array([64] * rows, pa.int32()),
            FINISH_REASON: ["length"] * rows,
            ERROR: pa.nulls(rows, pa.string()),
            ERROR_KIND: pa.nulls(rows, pa.string()),
        }
    )


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started
