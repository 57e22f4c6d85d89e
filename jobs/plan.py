"""Capacity planner: predicts throughput and $ per million output tokens of colocated and
disaggregated runs on each hardware mix of the catalogue, recommends the cheapest and prints it
as overrides for jobs.generate.

    python -m jobs.plan [model_spec=llama-3.1-8b] ['hardware=[h100,l4]'] [workload.output_tokens=256]
        [workload.path=prompts.parquet workload.tokenizer=DIR_OR_HUB_ID | workload.prompt_tokens=2048]
    python -m jobs.plan model_spec=deepseek-v3 'hardware=[h100,l4]' plan.max_devices=64
    python -m jobs.plan model_spec=smollm2-135m hardware=cpu-core calibrate.bench=outputs/bench/bench.json \\
        workload.path=outputs/bench/colocated plan.max_batch=64 plan.max_devices=2

Exit codes: 0 done, 2 bad input (one-line message), 1 bad Hydra override."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import JobError
from pipeline.plan.config import PlanConfig, register
from pipeline.plan.recommend import recommend

register()


@hydra.main(version_base=None, config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    plan: PlanConfig = OmegaConf.to_object(cfg)
    try:
        lines = recommend(plan)
    except JobError as error:
        print(f"kvrelay: error: {error}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
