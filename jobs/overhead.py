"""The pipeline's own cost per row: the real stages and a real engine given almost nothing to
do (every prompt null but a few, each row carrying a 2 KB column), at each dataset size and
mode. Prints rows/s over the whole run and over processing, and the driver's CPU seconds per
1,000 rows beside the whole job's (driver, Ray and every worker), so the ceiling the machinery
puts on a job of cheap rows can be read side by side.

    python -m jobs.overhead output.path=outputs/overhead [overhead.rows=[20000,200000]]
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.bench.config import OverheadConfig, register
from pipeline.bench.overhead import overhead

register()


@hydra.main(version_base=None, config_path="../conf", config_name="overhead")
def main(cfg: DictConfig) -> None:
    settings: OverheadConfig = OmegaConf.to_object(cfg)
    overhead(settings)


if __name__ == "__main__":
    main()
