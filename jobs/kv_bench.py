"""What the KV handoff costs, side by side in one run on one dataset:

- per codec (none, fp8, int8): KV bytes per prompt token against the model's formula, token
  agreement with the uncompressed run (share of rows identical, mean position of the first
  different token), handoff time as a share of prefill compute;
- per transport (object store, storage): the same, tokens identical to the object store's;
- peak object-store bytes for the dataset and for 10 times it (batches of 8), under the
  object-store budget cluster.object_store_budget_gib: prefill must not run ahead of decode
  without limit.

    python -m jobs.kv_bench input.path=prompts.parquet output.path=outputs/kv_bench cluster.object_store_budget_gib=0.25

Writes kv_bench.json beside the runs' outputs."""

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
