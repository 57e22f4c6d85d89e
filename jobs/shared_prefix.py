"""What shared prefixes travelling once saves (pipeline/bench/shared_prefix.py); writes
shared_prefix.json into output.path.

    python -m jobs.shared_prefix output.path=outputs/shared_prefix [kv.transport=storage]
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.bench.config import SharedPrefixConfig, register
from pipeline.bench.shared_prefix import shared_prefix

register()


@hydra.main(version_base=None, config_path="../conf", config_name="shared_prefix")
def main(cfg: DictConfig) -> None:
    settings: SharedPrefixConfig = OmegaConf.to_object(cfg)
    shared_prefix(settings)


if __name__ == "__main__":
    main()
