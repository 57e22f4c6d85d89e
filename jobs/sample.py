"""Writes the bundled sample: a few hundred varied prompts, from a few tokens to ~700.

python -m jobs.sample path=data/sample_prompts.parquet [rows=320] [seed=0]

A long-prompt workload (prompts of ~2k tokens):

python -m jobs.sample path=data/long_prompts.parquet rows=128 document_sentences=170"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.bench.sample import write_sample


@hydra.main(version_base=None, config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    write_sample(Path(cfg.path), cfg.rows, cfg.seed, cfg.document_sentences)
    print(f"wrote {cfg.rows} prompts to {cfg.path}")


if __name__ == "__main__":
    main()
