"""Batch generation: Parquet prompts in, Parquet completions out.

    python -m jobs.generate input.path=prompts.parquet output.path=out/ [mode=colocated]

Rerunning the same command after a crash finishes the job. Exit codes: 0 done, 1 bad
command line (Hydra names the key), 2 bad configuration, input or output (one-line message),
3 the job failed while running (one-line cause; the traceback is in the log file it names)."""

import hydra
from omegaconf import DictConfig

from pipeline.config import Phase, register
from pipeline.job.cli import run_phase

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_phase(cfg, Phase.generate)


if __name__ == "__main__":
    main()
