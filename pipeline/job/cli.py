"""A job on the command line: its exit codes and what it prints. 0 done (with the one-screen
summary), 2 a configuration, input or output the job refuses: fix the command (one line); 3 the
job failed or stopped short while running, or could not start yet (another run holds the
output): the same command run again gets past it or finishes the job (one-line cause; the
traceback goes to a log file it names). Hydra itself exits 1 on a bad command line."""

import re
import sys
import time
import traceback

import ray
from omegaconf import DictConfig, OmegaConf

from pipeline.api import run_job
from pipeline.cache import cache_dir
from pipeline.config import JobConfig, Phase
from pipeline.errors import JobError
from pipeline.job.summary import print_summary

_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*:")
# Ray's own wrappers around a worker's error: `UserCodeException: UDF failed ... To change retry
# attempts ...` follows the error it wraps in the traceback text.
_RAY_WRAPPERS = ("ray.exceptions.", "ray.data.exceptions.")
_MAX_CAUSE = 400


def run_phase(cfg: DictConfig, phase: Phase) -> None:
    job: JobConfig = OmegaConf.to_object(cfg)
    job.phase = phase
    try:
        metrics = run_job(job)
    except JobError as error:
        print(f"kvrelay: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:  # an engine that cannot start, workers out of restarts, storage gone
        log = cache_dir() / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{phase.value}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text(traceback.format_exc())
        ray.shutdown()  # its own farewells otherwise come after the one line that matters
        print(f"kvrelay: failed: {cause(error)} (traceback: {log})", file=sys.stderr)
        sys.exit(3)
    print_summary(job.output.path, metrics)


def cause(error: BaseException) -> str:
    """What went wrong, on one line: the root exception's name and message. A worker's error
    arrives as its traceback text, wrapped by Ray's own exceptions; the first unindented
    `Name: message` line that is not Ray's (with the line after it, where the message goes on)
    names the root."""
    for text in (str(error), str(getattr(error, "cause", None) or "")):
        lines = text.strip().splitlines()
        heads = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line) and not line.startswith(_RAY_WRAPPERS)]
        if heads:
            i = heads[0]
            more = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith(" ") else ""
            return f"{lines[i]} {more}".strip()[:_MAX_CAUSE]
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message}"[:_MAX_CAUSE]
