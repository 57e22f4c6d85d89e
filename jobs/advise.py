"""The parallel run before migrating, as one command: a deterministic sample of the input runs
colocated and disaggregated side by side on this machine (plain vLLM too where it applies), the
outputs are checked identical, the planner is calibrated on what was measured, and the advice
(the layout and P:D ratio on each hardware option, hours, $ and kWh for the whole job, whether
the split pays and why, the jobs.generate command) is printed and written to output.path as
_advice.md and _advice.json (pipeline/bench/advise.py).

    python -m jobs.advise input.path=prompts.parquet output.path=advice/ ['hardware=[h100,l4,a10g]'] \\
        [advise.sample_rows=512] [model=... sampling.max_tokens=... input.*=...: the job as it will run]

Exit codes: 0 done, 2 bad input (one-line message), 1 bad Hydra override."""

import sys

import hydra
import ray
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.bench.advise import advise
from pipeline.bench.config import AdviseConfig, register
from pipeline.errors import JobError

register()


@hydra.main(version_base=None, config_path="../conf", config_name="advise")
def main(cfg: DictConfig) -> None:
    try:
        if OmegaConf.is_missing(cfg.input, "path"):
            raise JobError("input.path is not set")
        settings: AdviseConfig = OmegaConf.to_object(cfg)
        said = advise(settings, list(HydraConfig.get().overrides.task))
    except JobError as error:
        print(f"kvrelay: error: {error}", file=sys.stderr)
        sys.exit(2)
    ray.shutdown()  # its workers' last log lines would come after the advice
    print("\n".join(said.lines))


if __name__ == "__main__":
    main()
