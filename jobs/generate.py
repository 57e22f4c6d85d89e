"""Batch generation: Parquet prompts in, Parquet completions out.

    python -m jobs.generate input.path=prompts.parquet output.path=out/ [mode=colocated]

Exit codes: 0 done, 2 bad configuration, input or output (one-line message)."""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.config import JobConfig, register
from pipeline.errors import JobError
from pipeline.job import run
from pipeline.report import print_summary

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job: JobConfig = OmegaConf.to_object(cfg)
    try:
        metrics = run(job)
    except JobError as error:
        print(f"kvrelay: error: {error}", file=sys.stderr)
        sys.exit(2)
    print_summary(job, metrics)


if __name__ == "__main__":
    main()
