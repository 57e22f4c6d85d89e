"""The pipeline's own cost per row (pipeline/bench/overhead.py); writes overhead.json into
output.path.

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
