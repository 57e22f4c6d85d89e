"""Batch generation: Parquet prompts in, Parquet completions out.

    python -m jobs.generate input.path=prompts.parquet output.path=out/ [mode=colocated]

Rerunning the same command after a crash finishes the job. Exit codes: 0 done, 1 bad
command line (Hydra names the key), 2 bad configuration, input or output (one-line message)."""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.config import JobConfig, Phase, register
from pipeline.errors import JobError
from pipeline.job import run
from pipeline.report import print_summary

register()


def run_phase(cfg: DictConfig, phase: Phase) -> None:
    job: JobConfig = OmegaConf.to_object(cfg)
    job.phase = phase
    try:
        metrics = run(job)
    except JobError as error:
        print(f"kvrelay: error: {error}", file=sys.stderr)
        sys.exit(2)
    print_summary(job, metrics)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_phase(cfg, Phase.generate)


if __name__ == "__main__":
    main()
