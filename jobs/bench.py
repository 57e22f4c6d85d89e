"""Throughput side by side: plain vLLM, the colocated and the disaggregated pipeline on one
dataset (pipeline/bench/throughput.py). Writes bench.json, bench.md and bench.png into output.path.

    python -m jobs.bench input.path=data/sample_prompts.parquet output.path=outputs/bench \
        [bench.modes=[...]] [bench.rounds=2]

A sweep of prefill:decode splits runs the bench once per split, each into a folder of
output.path named by its overrides, and writes the table across them into output.path; plain
vLLM and colocated run in its first job only (bench.baselines_once):

    python -m jobs.bench -m input.path=... output.path=outputs/bench-pd pools.prefill.size=1 pools.decode.size=1,2
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.bench.config import BenchConfig, register
from pipeline.bench.throughput import bench, later_job_of_sweep

register()


@hydra.main(version_base=None, config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> str:
    root = Path(HydraConfig.get().runtime.output_dir)  # output.path; in a sweep, this job's folder in it
    settings: BenchConfig = OmegaConf.to_object(cfg)
    return str(bench(settings, root, later_job_of_sweep()))


if __name__ == "__main__":
    main()
