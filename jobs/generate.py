"""Batch generation: Parquet prompts in, Parquet completions out.

    python -m jobs.generate input.path=prompts.parquet output.path=out/ [mode=colocated]

Rerunning the same command after a crash finishes the job. Exit codes: 0 done, 1 bad
command line (Hydra names the key), 2 bad configuration, input or output (one-line message),
3 the job failed while running (one-line cause; the traceback is in the log file it names)."""
import sys
import time
import traceback

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.cache import cache_dir
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
    except Exception as error:  # an engine that cannot start, workers out of restarts, storage gone
        log = cache_dir() / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{phase.value}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text(traceback.format_exc())
        cause = str(getattr(error, "cause", None) or error).strip().splitlines() or [type(error).__name__]
        print(f"kvrelay: failed: {type(error).__name__}: {cause[-1]} (traceback: {log})", file=sys.stderr)
        sys.exit(3)
    print_summary(job, metrics)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_phase(cfg, Phase.generate)


if __name__ == "__main__":
    main()
