"""What the KV handoff costs, by codec and transport, and object-store use at 1x and 10x the
dataset (pipeline/bench/kv_handoff.py); writes kv_bench.json beside the runs' outputs.

    python -m jobs.kv_bench input.path=prompts.parquet output.path=outputs/kv_bench cluster.object_store_budget_gib=0.25
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.bench.kv_handoff import kv_bench
from pipeline.config import JobConfig, register

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job: JobConfig = OmegaConf.to_object(cfg)
    kv_bench(job)


if __name__ == "__main__":
    main()
