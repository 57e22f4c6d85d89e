"""OpenAI Batch files against Parquet: rows/s to read a job's input and to write its results
(pipeline/bench/batch_files.py).

    python -m jobs.batch_files_bench [rows=1000] [rounds=3] [path=outputs/batch_files_bench]
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.bench.batch_files import batch_files_bench


@hydra.main(version_base=None, config_path="../conf", config_name="batch_files_bench")
def main(cfg: DictConfig) -> None:
    rates = batch_files_bench(Path(cfg.path), cfg.rows, cfg.rounds)
    print("\n".join(rates.lines(cfg.rows)))


if __name__ == "__main__":
    main()
