"""The pipeline's own cost per row: the real stages and a real engine given almost nothing to
do (every prompt null but a few, each row carrying a 2 KB column), at each dataset size and
mode. Prints rows/s over the whole run and over processing, and the driver's CPU seconds per
1,000 rows beside the whole job's (driver, Ray and every worker), so the ceiling the machinery
puts on a job of cheap rows can be read side by side.

    python -m jobs.overhead output.path=outputs/overhead [overhead.rows=[20000,200000]]
"""
import copy
import json
import time
from pathlib import Path

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Mode, OverheadConfig, OverheadSettings, register
from pipeline.job import run
from pipeline.metrics import ProcessTreeCPU

register()
PROMPTS = ["What is the capital of France?", "Name three primary colours.", "What is 2 + 2?", "Write a haiku about rain."]


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
    driver = time.process_time() - driver
    assert metrics["rows_out"] == rows, "rows lost"
    processing = metrics["wall_seconds"] - (metrics["startup_seconds"] or 0)
    return {
        "mode": mode.value,
        "rows": rows,
        "wall_seconds": metrics["wall_seconds"],
        "startup_seconds": metrics["startup_seconds"],
        "rows_per_second": round(rows / metrics["wall_seconds"]),
        "rows_per_second_after_startup": round(rows / processing),
        "driver_cpu_seconds_per_1000_rows": round(1000 * driver / rows, 4),
        "job_cpu_seconds_per_1000_rows": round(tree.peak / rows, 4),
        "driver_share_of_job_cpu": round(1000 * driver / tree.peak, 4) if tree.peak else None,
        "input_rows_decoded_per_row": round(metrics["input_rows_decoded"] / rows, 3),
    }


@hydra.main(version_base=None, config_path="../conf", config_name="overhead")
def main(cfg: DictConfig) -> None:
    overhead: OverheadConfig = OmegaConf.to_object(cfg)
    Path(overhead.input.path).mkdir(parents=True, exist_ok=True)
    results = []
    for rows in overhead.overhead.rows:
        dataset(Path(overhead.input.path) / f"{rows}.parquet", rows, overhead.overhead)
        for mode in overhead.overhead.modes:
            results.append(measure(overhead, mode, rows))
            print(json.dumps(results[-1]))
    (Path(overhead.output.path) / "overhead.json").write_text(json.dumps(results, indent=2))
    header = list(results[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in header) + " |")


if __name__ == "__main__":
    main()
