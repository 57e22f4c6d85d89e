"""Pools on clusters: the cluster= options, starting or joining Ray, the check that fails a job
no node can run before any work, and (slow) a local multi-node cluster with prefill and decode
node classes, where every row's prefill runs on a prefill node and its decode on a decode node,
with the output of a single-node run."""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import cluster_utils
from ray._common import utils as ray_common_utils
from ray._private import utils as ray_utils

import pipeline
from pipeline.cluster import Demand, Node, alive_nodes, check_schedulable, demands, start_ray
from pipeline.config import ClusterKind, PoolConfig
from pipeline.errors import JobError
from pipeline.io.storage import read_output
from pipeline.job.run import run
from pipeline.job.validate import check_cluster
from tests.conftest import job_config

REPO = Path(__file__).resolve().parents[1]
CPU_HEAD = Node("head", {"CPU": 2.0}, {})
PREFILL = Node("p", {"GPU": 1.0, "prefill_node": 1.0}, {"node_class": "prefill"})
DECODE = Node("d", {"GPU": 2.0, "decode_node": 2.0}, {"node_class": "decode"})
HETERO = [CPU_HEAD, PREFILL, DECODE]


def pool(**settings) -> dict[str, PoolConfig]:
    return {"prefill": PoolConfig(**{"num_cpus": 0, **settings})}


def fails(pools: dict[str, PoolConfig], nodes: list[Node]) -> str:
    with pytest.raises(JobError) as error:
        check_schedulable(demands(pools, 0.25), nodes)
    return str(error.value)


def test_pools_pinned_to_their_node_classes_are_schedulable():
    cfg = job_config("cluster=local-hetero", "pools.decode.size=2", "pools.decode.num_gpus=1")
    names = ("tokenize", "prefill", "decode", "detokenize")
    check_schedulable(demands({n: getattr(cfg.pools, n) for n in names}, cfg.cluster.io_num_cpus), HETERO)


def test_a_missing_node_class_names_the_resource():
    message = fails(pool(num_gpus=1, size=2, resources={"prefill_node": 1}), [CPU_HEAD, DECODE])
    assert message == (
        "pools.prefill asks 2 x {GPU: 1, prefill_node: 1}; the cluster has prefill_node: 0 (no node of that class)"
    )


def test_more_workers_than_gpus_of_the_class():
    message = fails({"decode": PoolConfig(num_cpus=0, num_gpus=1, size=3, resources={"decode_node": 1})}, HETERO)
    assert message.startswith("pools.decode asks 3 x {GPU: 1, decode_node: 1}; the nodes that can hold one hold 2")
    assert "pools.decode.size" in message


def test_a_worker_larger_than_any_node():
    two_gpus = pool(num_gpus=2, resources={"prefill_node": 1})
    assert fails(two_gpus, HETERO).endswith("the cluster has GPU: 1 at most on one node")
    # A prefill node with the GPUs, another with the CPU: never both on one node.
    nodes = [Node("g", {"GPU": 2.0, "prefill_node": 1.0}, {}), Node("c", {"CPU": 4.0, "prefill_node": 1.0}, {})]
    message = fails(pool(num_gpus=2, resources={"prefill_node": 1}, num_cpus=1), nodes)
    assert message.endswith("; no one node has all of it")


def test_an_unmatched_label_selector():
    message = fails(pool(label_selector={"node_class": "prefil"}), HETERO)
    assert message == (
        "pools.prefill asks 1 x {} on nodes labelled {node_class: prefil}; no alive node has those labels "
        "(the cluster's: node_class=decode, node_class=prefill)"
    )


@pytest.mark.parametrize("selector", ["prefill", "in(prefill, other)", "!decode", "!in(decode,cpu)"])
def test_label_selectors_as_ray_reads_them(selector):
    # Only the prefill node can hold the worker (1 GPU), so each selector must pick it.
    check_schedulable(demands(pool(num_gpus=1, label_selector={"node_class": selector}), 0), [PREFILL, DECODE])


def test_the_pools_together_must_fit_the_cluster():
    """Each pool fits alone; together they reserve more CPUs than there are (reading included)."""
    pools = {"tokenize": PoolConfig(num_cpus=1), "detokenize": PoolConfig(num_cpus=1)}
    message = fails(pools, HETERO)
    assert message == (
        "the pools ask 2.25 CPU in all (pools.tokenize 1 x 1, pools.detokenize 1 x 1, cluster.io_num_cpus 1 x 0.25); "
        "the cluster has 2: lower pools.<stage>.num_cpus or pools.<stage>.size, or add nodes"
    )


def test_a_pool_asking_nothing_fits_any_node():
    assert Demand.of("tamper", PoolConfig(num_cpus=0)).resources == {}
    check_schedulable(demands({"tamper": PoolConfig(num_cpus=0, size=4)}, 0), [CPU_HEAD])


def test_alive_nodes_drop_dead_nodes_and_rays_bookkeeping(monkeypatch):
    monkeypatch.setattr(
        ray,
        "nodes",
        lambda: [
            {
                "NodeID": "a",
                "Alive": True,
                "Labels": {"node_class": "prefill"},
                "Resources": {
                    "CPU": 4.0,
                    "prefill_node": 1.0,
                    "node:10.0.0.1": 1.0,
                    "memory": 1e9,
                    "object_store_memory": 1e8,
                },
            },
            {"NodeID": "b", "Alive": False, "Resources": {"CPU": 4.0}},
        ],
    )
    assert alive_nodes() == [Node("a", {"CPU": 4.0, "prefill_node": 1.0}, {"node_class": "prefill"})]


def test_cluster_options_compose():
    assert job_config().cluster.kind is ClusterKind.local
    hetero = job_config("cluster=local-hetero")
    assert hetero.cluster.kind is ClusterKind.local_hetero
    assert list(hetero.cluster.nodes) == ["cpu", "prefill", "decode"]
    assert hetero.cluster.nodes["prefill"].resources == hetero.pools.prefill.resources == {"prefill_node": 1}
    assert hetero.cluster.nodes["decode"].resources == hetero.pools.decode.resources == {"decode_node": 1}
    assert hetero.pools.tokenize.resources == {} and hetero.pools.prefill.num_cpus == 0
    existing = job_config("cluster=existing", "cluster.address=ray://head:10001", "cluster.ship_code=false")
    assert (existing.cluster.kind, existing.cluster.address, existing.cluster.ship_code) == (
        ClusterKind.existing,
        "ray://head:10001",
        False,
    )
    labelled = job_config(
        "cluster=local-hetero",
        "~pools.prefill.resources.prefill_node",
        "+pools.prefill.label_selector.node_class=prefill",
    )
    assert (labelled.pools.prefill.resources, labelled.pools.prefill.label_selector) == ({}, {"node_class": "prefill"})


@pytest.fixture
def no_ray(monkeypatch) -> list[dict]:
    """Stands in for ray.init: records what it was called with."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def test_existing_takes_the_address_ray_job_submit_sets(monkeypatch, no_ray):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    start_ray(job_config("cluster=existing").cluster)
    shipped = {"py_modules": [str(Path(pipeline.__file__).parent)]}
    assert no_ray == [{"address": "10.0.0.1:6379", "runtime_env": shipped}]


def test_existing_without_an_address_is_refused(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobError, match=r"cluster=existing needs cluster.address"):
        check_cluster(job_config("cluster=existing").cluster)


def test_an_image_with_the_code_ships_none(no_ray):
    start_ray(job_config("cluster=existing", "cluster.address=auto", "cluster.ship_code=false").cluster)
    assert no_ray == [{"address": "auto", "runtime_env": None}]


def test_local_hetero_starts_one_node_per_class_head_first(monkeypatch, no_ray):
    class FakeCluster:
        def __init__(self):
            self.nodes, self.connected = [], False

        def add_node(self, **args):
            self.nodes.append(args)

        def wait_for_nodes(self):
            pass

        def connect(self):
            self.connected = True

    reset: list[bool] = []
    monkeypatch.setenv("RAY_worker_niceness", "15")  # restored after the test, as is:
    monkeypatch.setattr(os, "setpriority", lambda *args: None)
    monkeypatch.setattr(cluster_utils, "Cluster", FakeCluster)
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda: None)
    monkeypatch.setattr(ray_common_utils, "reset_ray_address", lambda: reset.append(True))
    local = start_ray(job_config("cluster=local-hetero").cluster)
    assert reset == [True]  # later ray.init() calls on this machine do not join the job's cluster
    assert local.connected and no_ray == []
    assert [(n["num_cpus"], n["resources"], n["labels"]) for n in local.nodes] == [
        (2, {}, {}),
        (0, {"prefill_node": 1}, {"node_class": "prefill"}),
        (0, {"decode_node": 1}, {"node_class": "decode"}),
    ]
    assert local.nodes[0]["object_store_memory"] == 2**29


# Slow: these start Ray.


@pytest.mark.slow
def test_a_local_cluster_runs_its_workers_above_the_driver():
    """Ray Data's driver polls without pause while a stage is held back: on a shared machine
    it must not take the engines' cores (a subprocess: this one runs a Ray of its own)."""
    probe = (
        "import os, ray; from pipeline.cluster import start_ray; from tests.conftest import job_config\n"
        "start_ray(job_config().cluster)\n"
        "nice = ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0))\n"
        "print(ray.get(nice.remote()), os.getpriority(os.PRIO_PROCESS, 0))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    worker, driver = map(int, done.stdout.split()[-2:])
    assert (worker, driver) == (0, 10)


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Give a synonym for happy.",
    "Which planet is the largest?",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS}), path)
    return path


def _overrides(prompts: Path, output: Path) -> list[str]:
    small = [f"pools.{p}.batch_size=2" for p in ("tokenize", "prefill", "decode", "detokenize")]
    return [f"input.path={prompts}", f"output.path={output}", "sampling.max_tokens=16", "output.shard_rows=3", *small]


def _node_class(resources: dict) -> str:
    return next((name for name in ("prefill", "decode") if f"{name}_node" in resources), "cpu")


# One run tries both ways of pinning: prefill by custom resource, decode by node label.
DECODE_BY_LABEL = ["~pools.decode.resources.decode_node", "+pools.decode.label_selector.node_class=decode"]


@pytest.mark.slow
def test_local_hetero_runs_each_phase_on_its_node_class(prompts, tmp_path):
    """The job as a scheduler runs it (a subprocess: it starts its own multi-node cluster)."""
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.generate", "cluster=local-hetero", *_overrides(prompts, output), *DECODE_BY_LABEL],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((output / "_metrics.json").read_text())
    assert Counter(_node_class(r) for r in metrics["nodes"].values()) == {"cpu": 1, "prefill": 1, "decode": 1}
    for stage, node_class in (("tokenize", "cpu"), ("prefill", "prefill"), ("decode", "decode"), ("detokenize", "cpu")):
        rows = Counter()
        for worker in metrics["stages"][stage]["per_worker"]:
            rows[_node_class(metrics["nodes"][worker["node"]])] += worker["rows"]
        assert rows == {node_class: len(PROMPTS)}, (stage, rows)
    generated = read_output(str(output)).to_pylist()
    assert [r["id"] for r in generated] == [f"q{i}" for i in range(len(PROMPTS))]
    assert all(r["error"] is None and r["num_generated_tokens"] > 0 and r["generated_text"] for r in generated)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "++pools.prefill.resources.prefill_node=1",
            "pools.prefill asks 1 x {CPU: 0.4, prefill_node: 1}; the cluster has prefill_node: 0 (no node of that class)",
        ),
        (
            "+pools.decode.label_selector.node_class=decode",
            "pools.decode asks 1 x {CPU: 0.4} on nodes labelled {node_class: decode}; no alive node has those labels",
        ),
        ("pools.decode.size=9", "pools.decode asks 9 x {CPU: 0.4}; the nodes that can hold one hold 5 in all"),
        ("pools.prefill.size=3", "the pools ask 2.05 CPU in all"),
    ],
)
def test_an_unschedulable_pool_fails_within_seconds(ray_cluster, model, prompts, tmp_path, override, message):
    started = time.perf_counter()  # the model is prepared already (the fixture)
    with pytest.raises(JobError, match=re.escape(message)):
        run(job_config(*_overrides(prompts, tmp_path / "out"), override))
    assert time.perf_counter() - started < 10
