"""What an engine worker's devices can do at most, the denominators of its pool's utilisation: a
GPU's datasheet peaks from the hardware catalogue (conf/hardware/), found by its name; a CPU's
measured once per machine with a short matmul and copy probe, and cached."""

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf

from pipeline.cache import cache_dir
from pipeline.config import Device

CATALOGUE = Path(__file__).resolve().parents[2] / "conf" / "hardware"


@dataclass(frozen=True)
class Peak:
    flops_per_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class CpuPeak:
    """This machine's cores: one core's matmul FLOP/s and copy bandwidth, and the bandwidth of
    all of them at once (memory bandwidth does not grow with cores as compute does)."""

    flops_per_core: float
    bytes_per_core: float
    bytes_all_cores: float

    def of(self, cores: float) -> Peak:
        return Peak(self.flops_per_core * cores, min(self.bytes_per_core * cores, self.bytes_all_cores))


def worker_peak(device: Device, name: str, *, cores: float, gpus: int, dtype: str) -> Optional[Peak]:
    """The peak of one engine worker: `gpus` GPUs called `name`, or `cores` of this machine's
    CPU; None for a GPU the catalogue does not know."""
    if device is Device.cpu:
        return cpu_peak(dtype).of(cores)
    entry = catalogue_entry(name)
    return Peak(entry["tflops"] * 1e12 * gpus, entry["mem_bw_gbs"] * 1e9 * gpus) if entry else None


def catalogue_entry(device_name: str) -> Optional[dict]:
    """The catalogue entry whose key is a word of the device's name ('NVIDIA H100 80GB HBM3' -> h100)."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for path in sorted(CATALOGUE.glob("*.yaml")):
        for key, entry in OmegaConf.to_container(OmegaConf.load(path)).items():
            if key in words:
                return entry
    return None


def cpu_peak(dtype: str) -> CpuPeak:
    """Measured on the first call on this machine (about a second), then read from the cache."""
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", _cpu_model()).strip("-")
    path = cache_dir() / "peaks" / f"{cpu}-{os.cpu_count()}cpu-{dtype}.json"
    if path.is_file():
        return CpuPeak(**json.loads(path.read_text()))
    peak = _probe(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(peak)))
    return peak


def _cpu_model() -> str:
    from pipeline.engine.build import device_name

    return device_name(Device.cpu)


def _probe(dtype: str) -> CpuPeak:
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.randn(512, 512, dtype=getattr(torch, dtype))
        flops = 2 * 512**3 / _fastest(lambda: torch.mm(a, a))
        src = torch.empty(32 << 20, dtype=torch.float32)  # 128 MiB: well past any cache
        dst = torch.empty_like(src)
        copied = 2 * src.nbytes  # read and written
        one_core = copied / _fastest(lambda: dst.copy_(src))
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        all_cores = copied / _fastest(lambda: dst.copy_(src))
    finally:
        torch.set_num_threads(threads)
    return CpuPeak(flops, one_core, max(all_cores, one_core))


def _fastest(work: Callable[[], object], runs: int = 7) -> float:
    """The least seconds of `runs` calls, after one to warm up: noise on a shared machine only
    ever slows a call down."""
    work()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best
