"""The prefill half of a disaggregated job, as a job of its own: Parquet prompts in, a prefill
dataset out (ids, prompts, token ids, first token, KV payload or its file name, errors), for
`jobs.decode` to finish, possibly on another cluster or days later.

    python -m jobs.prefill input.path=prompts.parquet output.path=prefilled/ \
        [kv.transport=storage kv.storage_path=s3://bucket/kv/] [kv.codec=fp8]
"""

import hydra
from omegaconf import DictConfig

from pipeline.config import Phase, register
from pipeline.job.cli import run_phase

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_phase(cfg, Phase.prefill)


if __name__ == "__main__":
    main()
