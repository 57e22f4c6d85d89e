"""The one directory that holds everything kvrelay caches: converted models, vLLM and inductor caches."""

import os
from pathlib import Path

CACHE_DIR_ENV = "KVRELAY_CACHE_DIR"


def cache_dir() -> Path:
    path = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "kvrelay").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
