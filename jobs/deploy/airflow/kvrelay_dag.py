"""Airflow DAG: one kvrelay job a day on the KubeRay cluster of ../kuberay/raycluster.yaml,
done only when its output is complete (`_SUCCESS`, the last file a job writes).

`submit` creates ../kuberay/rayjob.yaml as a RayJob named for the day, with the DAG's input path
and the day's output path in its entrypoint; `finished` waits for the RayJob; `check_output`
reads the output's `_SUCCESS` and metrics. Clearing a failed run from `submit` reruns the same
command, which finishes the job: committed shards are kept. The Airflow worker needs kubectl
access to the RayCluster's namespace, PyYAML, and fsspec with the output's filesystem (gcsfs)."""

import json
import shlex
import subprocess
from datetime import datetime
from pathlib import Path

import fsspec
import yaml
from airflow.decorators import dag, task

RAYJOB = Path(__file__).resolve().parents[1] / "kuberay" / "rayjob.yaml"


def with_overrides(entrypoint: str, overrides: dict[str, str]) -> str:
    """The entrypoint's command with Hydra overrides set (replacing those it has)."""
    kept = [arg for arg in shlex.split(entrypoint) if arg.split("=", 1)[0] not in overrides]
    return shlex.join(kept + [f"{key}={value}" for key, value in overrides.items()])


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=True).stdout


@dag(
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={"input_path": "gs://my-bucket/prompts/", "output_root": "gs://my-bucket/generated/llama-3.1-8b"},
)
def kvrelay_generate():
    @task
    def submit(params=None, ds=None, ds_nodash=None) -> dict:
        job = yaml.safe_load(RAYJOB.read_text())
        name, output = f"kvrelay-{ds_nodash}", f"{params['output_root'].rstrip('/')}/{ds}/"
        job["metadata"]["name"] = name
        job["spec"]["entrypoint"] = with_overrides(
            job["spec"]["entrypoint"], {"input.path": params["input_path"], "output.path": output}
        )
        kubectl("delete", "rayjob", name, "--ignore-not-found")  # a rerun submits afresh
        kubectl("create", "-f", "-", stdin=yaml.safe_dump(job))
        return {"name": name, "output": output}

    @task.sensor(poke_interval=60, timeout=24 * 3600, mode="reschedule")
    def finished(job: dict) -> bool:
        status = kubectl("get", "rayjob", job["name"], "-o", "jsonpath={.status.jobStatus}")
        if status in ("FAILED", "STOPPED"):
            raise RuntimeError(f"RayJob {job['name']} is {status}: kubectl describe rayjob {job['name']}")
        return status == "SUCCEEDED"

    @task
    def check_output(job: dict) -> dict:
        fs, root = fsspec.core.url_to_fs(job["output"])
        root = root.rstrip("/")
        if not fs.exists(f"{root}/_SUCCESS"):
            raise RuntimeError(f"{job['output']} has no _SUCCESS: the job did not finish")
        with fs.open(f"{root}/_metrics.json") as f:
            metrics = json.load(f)
        return {key: metrics[key] for key in ("rows_in", "rows_out", "rows_errored", "output_tokens_per_second")}

    job = submit()
    finished(job) >> check_output(job)


kvrelay_generate()
