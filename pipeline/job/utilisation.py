"""An engine pool's utilisation: its work's FLOPs and memory bytes (pipeline/engine/work.py) per
worker-second busy, against one worker's peak (pipeline/job/peak.py). Prefill should sit near
the compute peak at hundreds of FLOPs per byte, decode near the bandwidth peak at tens: the
asymmetry the split exists for, shown on the job's own run."""

from typing import Optional

from pipeline.config import Device, EngineConfig
from pipeline.job.metrics import StageMetrics, Utilisation
from pipeline.job.peak import Peak, worker_peak


def pool_utilisation(stage: StageMetrics, engine: EngineConfig, dtype: str) -> Optional[Utilisation]:
    """None for a pool that did no metered engine work (or whose model's weights were not counted)."""
    if not stage.model_flops or not stage.busy_seconds:
        return None
    device = next((w.device for w in stage.per_worker if w.device), "")
    cores = stage.cores_per_worker
    peak = worker_peak(engine.device, device, cores=cores, gpus=engine.tensor_parallel_size, dtype=dtype)
    where = f"{device}, {cores:g} core{'s' if cores != 1 else ''}" if engine.device is Device.cpu else device
    return utilisation(stage, peak, where)


def utilisation(stage: StageMetrics, peak: Optional[Peak], device: str) -> Utilisation:
    """The pool's rates per worker while busy (its work over its workers' summed busy seconds)
    and their shares of `peak`."""
    flops, traffic = stage.model_flops / stage.busy_seconds, stage.memory_bytes / stage.busy_seconds
    return Utilisation(
        device=device,
        flops_per_s=flops,
        bytes_per_s=traffic,
        intensity=stage.model_flops / stage.memory_bytes,
        peak_flops_per_s=peak.flops_per_s if peak else None,
        peak_bytes_per_s=peak.bytes_per_s if peak else None,
        compute_share=flops / peak.flops_per_s if peak else None,
        bandwidth_share=traffic / peak.bytes_per_s if peak else None,
    )
