"""Where each engine pool runs. On one machine (cluster=local, or local-hetero, whose nodes all
run here), each CPU engine pool gets its own cores, so the prefill and decode pools do not
compete for them. Which nodes a pool may use is Ray's business (pools.<stage>.resources and
label_selector; pipeline/cluster.py checks that they can be met)."""

import logging
import os
from dataclasses import dataclass

from pipeline.config import ClusterKind, Device, JobConfig, Mode, Phase, PoolConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    cores: list[int] | None  # None: the engine may use every core of its node
    threads: int | None

    def env(self) -> dict[str, str]:
        """The engine actor's process environment. OpenMP reads its thread count once, when the
        process loads it; set later, threads that vLLM starts disagree with the main thread
        (and the CPU attention kernel refuses to run)."""
        return {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}


def engine_pools(cfg: JobConfig) -> dict[str, PoolConfig]:
    if cfg.mode is Mode.colocated:
        return {"colocated": cfg.pools.colocated}
    names = ("prefill", "decode") if cfg.phase is Phase.generate else (cfg.phase.value,)
    return {name: getattr(cfg.pools, name) for name in names}


def place_engines(cfg: JobConfig) -> dict[str, Placement]:
    pools = engine_pools(cfg)
    unbound = {name: Placement(None, pool.cpu_threads) for name, pool in pools.items()}
    # On a real cluster this machine's cores say nothing about the workers' nodes.
    if cfg.engine.device is not Device.cpu or not cfg.engine.bind_cores or cfg.cluster.kind is ClusterKind.existing:
        return unbound
    cores = sorted(os.sched_getaffinity(0))
    weights = [pool.size * (pool.cpu_threads or 1) for pool in pools.values()]
    if len(cores) < len(pools):
        log.warning("%d cores for %d engine pools: pools share cores", len(cores), len(pools))
        return unbound
    shares = _split(len(cores), weights)
    placements, start = {}, 0
    for (name, pool), share in zip(pools.items(), shares):
        own = cores[start : start + share]
        placements[name] = Placement(own, pool.cpu_threads or max(1, len(own) // pool.size))
        start += share
    return placements


def _split(total: int, weights: list[int]) -> list[int]:
    """Split `total` cores in proportion to `weights`, at least one each (largest remainder)."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
