"""The pipeline's own cost per row: the real stages and a real engine given almost nothing to
do (every prompt null but a few, each row carrying a 2 KB column), at each dataset size and
mode. Prints rows/s over the whole run and over processing, and the driver's CPU seconds per
1,000 rows beside the whole job's (driver, Ray and every worker), so the ceiling the machinery
puts on a job of cheap rows can be read side by side."""

import copy
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench.config import OverheadConfig, OverheadSettings
from pipeline.config import Mode
from pipeline.job.run import run
from pipeline.job.usage import ProcessTreeCPU

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 2 + 2?",
    "Write a haiku about rain.",
]


def dataset(path: Path, rows: int, settings: OverheadSettings) -> None:
    """`rows` rows in one row group (as pandas and pyarrow write by default)."""
    prompts = [PROMPTS[i % len(PROMPTS)] if i < settings.prompts else None for i in range(rows)]
    text = pa.array(["x" * settings.text_bytes] * rows, pa.string())
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string()), "text": text}), path, row_group_size=rows)


def measure(cfg: OverheadConfig, mode: Mode, rows: int) -> dict:
    job = copy.deepcopy(cfg)
    job.mode = mode
    job.input.path = f"{cfg.input.path}/{rows}.parquet"
    job.output.path = f"{cfg.output.path}/{mode.value}-{rows}"
    job.output.overwrite = True
    driver = time.process_time()
    with ProcessTreeCPU() as tree:
        metrics = run(job)
    # The sampler's own CPU is the measurement's, not the job's.
    driver = time.process_time() - driver - tree.cpu_seconds
    job_cpu = tree.peak / 1000 - tree.cpu_seconds
    assert metrics.rows_out == rows, "rows lost"
    processing = metrics.wall_seconds - (metrics.startup_seconds or 0)
    return {
        "mode": mode.value,
        "rows": rows,
        "wall_seconds": metrics.wall_seconds,
        "startup_seconds": metrics.startup_seconds,
        "rows_per_second": round(rows / metrics.wall_seconds),
        "rows_per_second_after_startup": round(rows / processing),
        "driver_cpu_seconds_per_1000_rows": round(1000 * driver / rows, 4),
        "job_cpu_seconds_per_1000_rows": round(1000 * job_cpu / rows, 4),
        "driver_share_of_job_cpu": round(driver / job_cpu, 4) if job_cpu > 0 else None,
        "input_rows_decoded_per_row": round(metrics.input_rows_decoded / rows, 3),
    }


def overhead(cfg: OverheadConfig) -> list[dict]:
    """Every dataset size through every mode; writes overhead.json into output.path and prints
    the table."""
    Path(cfg.input.path).mkdir(parents=True, exist_ok=True)
    results = []
    for rows in cfg.overhead.rows:
        dataset(Path(cfg.input.path) / f"{rows}.parquet", rows, cfg.overhead)
        for mode in cfg.overhead.modes:
            results.append(measure(cfg, mode, rows))
            print(json.dumps(results[-1]))
    (Path(cfg.output.path) / "overhead.json").write_text(json.dumps(results, indent=2))
    header = list(results[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in header) + " |")
    return results
