"""The deployment examples, checked without Kubernetes or Airflow: the KubeRay RayCluster offers
exactly what the RayJob's Hydra config asks for (node classes, GPUs, CPUs), its GPU groups
land on the intended GPU types, the RayJob's command line composes, and the Airflow DAG
submits that RayJob and waits for `_SUCCESS`."""

import ast
import json
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.cluster import Node, check_schedulable, demands
from pipeline.config import ClusterKind
from tests.conftest import job_config

DEPLOY = Path(__file__).resolve().parents[1] / "jobs" / "deploy"
RAYCLUSTER = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
RAYJOB = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
DAG = DEPLOY / "airflow" / "kvrelay_dag.py"
GROUPS = {g["groupName"]: g for g in RAYCLUSTER["spec"]["workerGroupSpecs"]}
ENGINE_POOLS = {"prefill": "prefill-h100", "decode": "decode-l4"}


def ray_resources(group: dict) -> dict[str, float]:
    """What a Ray node of the group offers, from its rayStartParams (KubeRay quotes the
    custom resources' JSON once more)."""
    params = group["rayStartParams"]
    custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    return {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0)), **custom}


def cluster_nodes() -> list[Node]:
    head = Node("head", ray_resources(RAYCLUSTER["spec"]["headGroupSpec"]), {})
    workers = [Node(f"{name}-{i}", ray_resources(g), {}) for name, g in GROUPS.items() for i in range(g["replicas"])]
    return [head, *workers]


def entrypoint_overrides(entrypoint: str) -> list[str]:
    command = shlex.split(entrypoint)
    assert command[:3] == ["python", "-m", "jobs.generate"]
    return command[3:]


@pytest.fixture(scope="module")
def job():
    return job_config(*entrypoint_overrides(RAYJOB["spec"]["entrypoint"]))


def test_the_rayjob_runs_llama_on_the_raycluster(job):
    assert RAYJOB["spec"]["clusterSelector"] == {"ray.io/cluster": RAYCLUSTER["metadata"]["name"]}
    assert RAYCLUSTER["spec"]["rayVersion"] == ray.__version__
    assert job.model.checkpoint == "meta-llama/Llama-3.1-8B-Instruct" and job.engine.device == "cuda"
    assert (job.cluster.kind, job.cluster.address, job.cluster.ship_code) == (ClusterKind.existing, "auto", False)
    assert job.input.path.startswith("gs://") and job.output.path.startswith("gs://")


def test_the_raycluster_holds_every_pool_the_job_asks_for(job):
    pools = {name: getattr(job.pools, name) for name in ("tokenize", "prefill", "decode", "detokenize")}
    check_schedulable(demands(pools, job.cluster.io_num_cpus), cluster_nodes())


@pytest.mark.parametrize("pool, accelerator", [("prefill", "nvidia-h100-80gb"), ("decode", "nvidia-l4")])
def test_each_engine_pool_has_one_worker_per_gpu_of_its_node_class(job, pool, accelerator):
    group = GROUPS[ENGINE_POOLS[pool]]
    spec = group["template"]["spec"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": accelerator}
    [container] = spec["containers"]
    gpus = ray_resources(group)["GPU"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # The pool's custom resource is offered by its group alone, one per GPU, and uses them all.
    config = getattr(job.pools, pool)
    [(resource, per_worker)] = config.resources.items()
    assert {name for name, g in GROUPS.items() if resource in ray_resources(g)} == {ENGINE_POOLS[pool]}
    assert ray_resources(group)[resource] == gpus and config.num_gpus == per_worker == 1
    assert config.size == gpus * group["replicas"]


def test_no_cpu_stage_can_land_on_a_gpu_node(job):
    assert all(ray_resources(GROUPS[g])["CPU"] == 0 for g in ENGINE_POOLS.values())
    assert job.pools.prefill.num_cpus == job.pools.decode.num_cpus == 0


def test_every_pod_runs_the_same_image():
    containers = [RAYCLUSTER["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in GROUPS.values()]
    assert len({c["image"] for c in containers}) == 1


def test_the_airflow_dag_submits_the_rayjob_and_checks_success():
    """Parsed, not imported: Airflow is not installed here. Its override helper is run on the
    RayJob's entrypoint, and the result composes as a job config."""
    tree = ast.parse(DAG.read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert {"submit", "finished", "check_output"} <= set(functions)
    strings = [n.value for n in ast.walk(functions["check_output"]) if isinstance(n, ast.Constant)]
    assert any("/_SUCCESS" in str(s) for s in strings)
    namespace: dict = {}
    helper = ast.Module([*ast.parse("import shlex").body, functions["with_overrides"]], type_ignores=[])
    exec(compile(helper, str(DAG), "exec"), namespace)
    paths = {"input.path": "gs://b/in/", "output.path": "gs://b/out/2025-01-02/"}
    entrypoint = namespace["with_overrides"](RAYJOB["spec"]["entrypoint"], paths)
    cfg = job_config(*entrypoint_overrides(entrypoint))
    assert (cfg.input.path, cfg.output.path, cfg.pools.decode.size) == ("gs://b/in/", "gs://b/out/2025-01-02/", 7)
    assert entrypoint.count("output.path=") == 1
