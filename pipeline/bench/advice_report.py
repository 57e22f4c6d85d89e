"""jobs.advise's answer, put together from the sample's run (pipeline/bench/advise.py), the
options (pipeline/bench/advice.py) and the verdict on the split (pipeline/bench/verdict.py):
`_advice.json` for a program, and the same figures as `_advice.md` for a person
(pipeline/bench/advice_text.py)."""

import math
from dataclasses import asdict, dataclass, replace

from pipeline.bench.advice import (
    MEASURED,
    PLANNED,
    Choice,
    Identity,
    MachineRun,
    command,
    decide,
    measured,
    per_device,
    planned,
)
from pipeline.bench.advice_text import text
from pipeline.bench.config import AdviseConfig, AdviseSettings
from pipeline.bench.results import bench_rows
from pipeline.bench.verdict import judge
from pipeline.config import ENGINE_POOLS
from pipeline.job.metrics import JobMetrics
from pipeline.plan.roofline import Hardware, ModelSpec, Option, Planner, Pool, Workload


@dataclass
class Advice:
    lines: list[str]  # _advice.md
    figures: dict  # _advice.json


def advice(
    cfg: AdviseConfig,
    *,
    run: MachineRun,
    gpu: ModelSpec,
    devices: list[Hardware],
    identity: Identity,
    total_rows: int,
    task: list[str],
    sample: str,
) -> Advice:
    """The advice on the input's `total_rows` rows: the machine at hand's modes as measured,
    each of `devices` as the planner prices it for `gpu`, the choice and why."""
    sampled = JobMetrics.from_dict(run.results["colocated"])
    mean = Workload.from_metrics(sampled)
    # The rows that generate: the sample's share of them (an overlong prompt is refused, not run).
    workload = Workload(mean.prompt_tokens, mean.output_tokens, round(total_rows * mean.rows / sampled.rows_in))
    rows = {row["mode"]: row for row in bench_rows(run.results)}
    here = Planner(run.spec, workload, run.efficiency, run.settings)
    theirs = job_sized(Planner(gpu, workload, cfg.efficiency, cfg.plan), devices, cfg.advise)
    mine, options = machine_options(here, run), theirs.options(devices) if devices else []
    choices = machine_choices(run, rows, mine, total_rows)
    choices += [planned(o, workload.output_tokens * workload.rows) for o in per_device(options, devices)]
    sides = {MEASURED: (here, list(mine)), PLANNED: (theirs, options)}
    verdict = judge(choices, cfg.advise.min_saving, identity, sides, rows)
    here_choice = decide([c for c in choices if c.basis == MEASURED], cfg.advise.min_saving, identity.identical)[0]
    said = {
        "input": {"path": cfg.input.path, "rows": total_rows},
        "sample": {"path": sample, "rows": sampled.rows_in, "seed": cfg.advise.seed},
        "model": model_figures(gpu, run.spec),
        "workload": {**asdict(workload), "output_tokens_total": workload.output_tokens * workload.rows},
        "identity": identity_figures(identity),
        "measured": {
            "machine": run.hardware.name,
            "cores": run.cores,
            "modes": list(rows.values()),
            "plain_skipped": run.plain_skipped,
            "predicted_by_calibrated_planner": {o.mode: o.output_tokens_per_s for o in mine},
        },
        "efficiency": {"machine": asdict(run.efficiency), "planned": asdict(cfg.efficiency)},
        "planned_max_devices": theirs.settings.max_devices,
        "options": [choice_figures(c, cfg.input.path, task) for c in choices],
        "recommendation": choice_figures(verdict.chosen, cfg.input.path, task),
        "here": choice_figures(here_choice, cfg.input.path, task),
        "split_pays": verdict.chosen.mode == "disaggregated",
        "verdict": verdict.pays,
        "reasons": verdict.reasons,
    }
    return Advice(lines=text(said, cfg, run, choices, verdict), figures=said)


def job_sized(planner: Planner, devices: list[Hardware], settings: AdviseSettings) -> Planner:
    """The planner on as many devices per option as the job keeps busy well past their start-up:
    at most those whose `gpu_startup_s` is `startup_share` of the run at the best per-device rate
    (the planner's steady state counts no start-up, so it would spread a small job over all
    plan.max_devices); at least a split's two engines of the smallest size that holds the model."""
    if not devices:
        return planner
    options = planner.options(devices)
    per_device = max(o.output_tokens_per_s / sum(p.devices for p in o.pools) for o in options)
    job = planner.workload.output_tokens * planner.workload.rows
    worth = math.floor(settings.startup_share * job / (settings.gpu_startup_s * per_device))
    most = planner.settings.max_devices
    engine = max(sizes[0] for hw in devices if (sizes := planner.engine_sizes(hw, most)))
    most = min(most, max(worth, 2 * engine))
    return Planner(planner.model, planner.workload, planner.eff, replace(planner.settings, max_devices=most))


def machine_choices(
    run: MachineRun, rows: dict[str, dict], mine: tuple[Option, Option], total_rows: int
) -> list[Choice]:
    """The bench's modes for the whole input; each pipeline mode with its calibrated option."""
    plain = [measured("plain", run, total_rows, "-")] if "error" not in rows.get("plain", {"error": None}) else []
    return plain + [
        replace(measured("colocated", run, total_rows, mine[0].bound), option=mine[0]),
        replace(measured("disaggregated", run, total_rows, rows["disaggregated"]["slower_pool"]), option=mine[1]),
    ]


def machine_options(planner: Planner, run: MachineRun) -> tuple[Option, Option]:
    """The calibrated planner's colocated and split options on the cores each pool ran on."""
    cores = {}
    for mode in ("colocated", "disaggregated"):
        for name, stage in JobMetrics.from_dict(run.results[mode]).stages.items():
            if name in ENGINE_POOLS:
                cores[name] = len(stage.cores)
    pool = lambda name: Pool(run.hardware, cores[name])  # noqa: E731
    return planner.colocated(pool("colocated")), planner.disaggregated(pool("prefill"), pool("decode"))


def identity_figures(identity: Identity) -> dict:
    return {
        "identical": identity.identical,
        "rows_compared": identity.rows,
        "rows_differing": len(identity.differing),
        "differing_ids": identity.differing,
    }


def model_figures(gpu: ModelSpec, here: ModelSpec) -> dict:
    return {
        "name": gpu.name,
        "params": gpu.params,
        "active_params": gpu.flop_params,
        "cache_family": gpu.cache.family.value,
        "kv_bytes_per_token": {"gpu": gpu.cache.bytes_per_token, "here": here.cache.bytes_per_token},
        "weight_bytes_per_param": {"gpu": gpu.dtype_bytes, "here": here.dtype_bytes},
    }


def choice_figures(c: Choice, input_path: str, task: list[str]) -> dict:
    return {
        "hardware": c.hardware,
        "mode": c.mode,
        "pools": c.pools,
        "p_d": c.p_d,
        "output_tokens_per_s": c.output_tokens_per_s,
        "usd_per_m_tokens": c.usd_per_m_tokens,
        **asdict(c.forecast),
        "bound": c.bound,
        "basis": c.basis,
        "overrides": list(c.overrides) if c.overrides is not None else None,
        "command": command(input_path, task, c) if c.overrides is not None else None,
    }
