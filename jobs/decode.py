"""The decode half of a disaggregated job: a prefill dataset (from `jobs.prefill`) in, the
output contract of `jobs.generate` out, identical to a one-job run with the same config.

    python -m jobs.decode input.path=prefilled/ output.path=out/ [kv.storage_path=s3://bucket/kv/]
"""

import hydra
from omegaconf import DictConfig

from pipeline.config import Phase, register
from pipeline.job.cli import run_phase

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_phase(cfg, Phase.decode)


if __name__ == "__main__":
    main()
