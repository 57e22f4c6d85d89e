"""Resolves the configured model ahead of a job: converts a bundled GGUF into the cache dir once.

python -m jobs.prepare_model [model=...]"""

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.config import EngineConfig, register
from pipeline.engine.model import resolve_model

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    engine: EngineConfig = OmegaConf.to_object(cfg.engine)
    model = resolve_model(OmegaConf.to_object(cfg.model), engine)
    print(f"model {cfg.model.name} ready at {model.path} (fingerprint {model.fingerprint})")


if __name__ == "__main__":
    main()
