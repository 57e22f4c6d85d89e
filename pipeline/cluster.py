"""The Ray cluster a job runs on: started here, started as a local multi-node test cluster, or
joined; and whether the pools can ever be scheduled on it, checked before any work so that a
pool no node can hold fails with a message instead of waiting forever."""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import ray

import pipeline
from pipeline.config import ClusterConfig, ClusterKind, PoolConfig
from pipeline.errors import JobError

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

_EPSILON = 1e-6  # Ray keeps fractional resources to 1e-4
_DRIVER_NICENESS = 10


def start_ray(cluster: ClusterConfig) -> "Cluster | None":
    """Starts or joins Ray as cluster.kind says; a Ray this process already runs (as in tests)
    is used as it is. Returns the local-hetero test cluster, whose nodes stop when this process
    exits or when the caller shuts it down. The config has passed pipeline.job.validate."""
    if ray.is_initialized():
        return None
    if cluster.kind is ClusterKind.existing:
        ray.init(address=cluster.address, runtime_env=shipped_code(cluster))
        return None
    # This machine's cores are shared by the driver and the workers. Ray starts workers at
    # niceness 15, and Ray Data's scheduling loop, in this process, polls without pause while a
    # stage is held back by its budget: the engines would run on what the driver leaves. So the
    # workers start at normal priority and, once Ray's own processes are up, the driver (this
    # thread and those it starts later, Ray Data's executor among them) drops below them.
    os.environ["RAY_worker_niceness"] = "0"  # read by the raylet ray.init starts
    local = _start_local_hetero(cluster) if cluster.kind is ClusterKind.local_hetero else None
    if local is None:
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=False)
    os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), _DRIVER_NICENESS))
    return local


def shipped_code(cluster: ClusterConfig) -> dict | None:
    """The runtime_env that gives every worker this driver's pipeline package (its
    dependencies, vLLM above all, must be on the cluster's image)."""
    return {"py_modules": [str(Path(pipeline.__file__).parent)]} if cluster.ship_code else None


def _start_local_hetero(cluster: ClusterConfig) -> "Cluster":
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address, write_ray_address
    from ray.cluster_utils import Cluster

    previous = read_ray_address()
    local = Cluster()
    for node in cluster.nodes.values():  # the first becomes the head
        local.add_node(
            num_cpus=node.num_cpus,
            num_gpus=node.num_gpus,
            resources=dict(node.resources),
            labels=dict(node.labels),
            object_store_memory=int(node.object_store_gib * 2**30),
            include_dashboard=False,
        )
    # The head made itself this machine's default cluster, which every later ray.init() here
    # (another job, a test session) would join, even once it is gone: it is this job's own.
    if previous:
        write_ray_address(previous)
    else:
        reset_ray_address()
    local.wait_for_nodes()
    local.connect()
    return local


class Node(NamedTuple):
    id: str
    resources: dict[str, float]  # totals: CPU, GPU, custom
    labels: dict[str, str]


def on_driver_node() -> dict:
    """Options for a job's own actors (its metrics sink, its shared-block registry): on the
    driver's node, they go only with the job, never with a worker node (a reclaimed spot node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes, from ray.nodes(), without Ray's per-node markers
    (`node:<ip>`) and memory figures, which no pool asks for."""
    return [
        Node(n["NodeID"], {k: v for k, v in n["Resources"].items() if not _bookkeeping(k)}, n.get("Labels") or {})
        for n in ray.nodes()
        if n["Alive"]
    ]


def _bookkeeping(resource: str) -> bool:
    return resource.startswith("node:") or resource in ("memory", "object_store_memory")


@dataclass(frozen=True)
class Demand:
    """What a pool asks of the cluster: `size` workers, each needing `resources` on one node
    whose labels match `labels`."""

    key: str  # the config the user changes: pools.prefill, cluster.io_num_cpus
    size: int
    resources: dict[str, float]
    labels: dict[str, str]

    @classmethod
    def of(cls, name: str, pool: PoolConfig) -> "Demand":
        asks = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
        return cls(f"pools.{name}", pool.size, {k: v for k, v in asks.items() if v}, dict(pool.label_selector))

    def asks(self) -> str:
        where = f" on nodes labelled {_braces(self.labels)}" if self.labels else ""
        return f"{self.size} x {_braces(self.resources)}{where}"


def demands(pools: dict[str, PoolConfig], io_num_cpus: float) -> list[Demand]:
    """What a job's pools and its Parquet reading ask of the cluster."""
    reading = Demand("cluster.io_num_cpus", 1, {"CPU": io_num_cpus} if io_num_cpus else {}, {})
    return [Demand.of(name, pool) for name, pool in pools.items()] + [reading]


def check_schedulable(wanted: list[Demand], nodes: list[Node]) -> None:
    """Raises JobError unless every pool can be scheduled: one worker fits on some node its
    labels allow, `size` of them fit on those nodes together, and all pools fit the cluster at
    once (they hold their workers for the whole run). Sums per resource, not a bin packing: a
    cluster fragmented across pools may still pass."""
    for demand in wanted:
        _check_pool(demand, nodes)
    for resource in sorted({r for d in wanted for r in d.resources}):
        need = sum(d.size * d.resources.get(resource, 0) for d in wanted)
        have = sum(n.resources.get(resource, 0) for n in nodes)
        if need > have + _EPSILON:
            asking = [d for d in wanted if resource in d.resources]
            pools = ", ".join(f"{d.key} {d.size} x {d.resources[resource]:g}" for d in asking)
            raise JobError(
                f"the pools ask {need:g} {resource} in all ({pools}); the cluster has {have:g}: "
                f"lower {_setting(resource)} or pools.<stage>.size, or add nodes"
            )


def _check_pool(demand: Demand, nodes: list[Node]) -> None:
    allowed = [n for n in nodes if _matches(demand.labels, n.labels)]
    if not allowed:
        seen = sorted({f"{k}={v}" for n in nodes for k, v in n.labels.items() if k in demand.labels})
        raise JobError(
            f"{demand.key} asks {demand.asks()}; no alive node has those labels"
            f" (the cluster's: {', '.join(seen) or 'none of these keys'})"
        )
    fits = sum(_workers_on(n, demand) for n in allowed)
    if fits == 0:
        # Compare with the nodes of the class the pool is pinned to, if there are any.
        custom = [r for r in demand.resources if r not in ("CPU", "GPU")]
        of_class = [n for n in allowed if all(n.resources.get(r, 0) for r in custom)] or allowed
        most = {r: max(n.resources.get(r, 0) for n in of_class) for r in demand.resources}
        short = [
            f"{r}: {have:g}" + (_none_of(r) if have == 0 else " at most on one node")
            for r, have in most.items()
            if have + _EPSILON < demand.resources[r]
        ]
        has = "; the cluster has " + ", ".join(short) if short else "; no one node has all of it"
        raise JobError(f"{demand.key} asks {demand.asks()}{has}")
    if fits < demand.size:
        raise JobError(
            f"{demand.key} asks {demand.asks()}; the nodes that can hold one hold {fits} in all: "
            f"lower {demand.key}.size or add nodes"
        )


def _workers_on(node: Node, demand: Demand) -> int:
    if not demand.resources:
        return demand.size
    return min(math.floor(node.resources.get(r, 0) / v + _EPSILON) for r, v in demand.resources.items())


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector: each key's value is "v", "!v", "in(a,b)" or "!in(a,b)"."""

    def match(label: str | None, condition: str) -> bool:
        negated = condition.startswith("!")
        condition = condition.removeprefix("!")
        values = {v.strip() for v in condition[3:-1].split(",")} if condition.startswith("in(") else {condition}
        return (label in values) != negated

    return all(match(labels.get(key), condition) for key, condition in selector.items())


def _none_of(resource: str) -> str:
    return " (no node has any)" if resource in ("CPU", "GPU") else " (no node of that class)"


def _setting(resource: str) -> str:
    return "pools.<stage>." + {"CPU": "num_cpus", "GPU": "num_gpus"}.get(resource, f"resources.{resource}")


def _braces(values: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items()) + "}"
