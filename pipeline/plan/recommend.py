"""The capacity planner's answer to a jobs.plan run: every option's predicted throughput, cost
and energy, the cheapest one kvrelay runs, and the jobs.generate overrides that run it."""

from pipeline.bench.results import bench_rows
from pipeline.errors import JobError
from pipeline.plan.config import PlanConfig
from pipeline.plan.roofline import (
    Efficiency,
    Hardware,
    ModelSpec,
    Option,
    Planner,
    Workload,
    catalogue,
    cheapest,
    load_bench,
)


def load_workload(cfg: PlanConfig) -> Workload:
    w = cfg.workload
    if w.path:
        return Workload.from_parquet(w.path, w.prompt_column, w.tokenizer, w.output_tokens)
    return Workload(w.prompt_tokens, w.output_tokens, w.rows)


def calibrate(cfg: PlanConfig, model: ModelSpec, devices: list[Hardware]) -> tuple[Efficiency, list[str]]:
    """The efficiency factors to plan with, and lines that say where they come from."""
    bench, name = cfg.calibrate.bench, cfg.calibrate.hardware
    if not bench:
        return cfg.efficiency, []
    if name is None and len(devices) > 1:
        raise JobError("set calibrate.hardware: the catalogue entry the bench ran on")
    found = [hw for hw in devices if hw.name == name] if name else devices
    if not found:
        selected = ", ".join(hw.name for hw in devices)
        raise JobError(f"calibrate.hardware '{name}' is not among the selected hardware ({selected})")
    eff = Efficiency.from_bench(bench, found[0], model, cfg.plan, cfg.efficiency.network)
    rows = bench_rows(load_bench(bench))
    return eff, [
        f"  calibrated on the disaggregated stage rates of {bench}, run on {found[0].name}",
        "  bench output tok/s while processing (whole run, start-up included): "
        + "; ".join(
            f"{r['mode']} {r['processing_output_tokens_per_s']:.1f} ({r['output_tokens_per_s']:.1f})" for r in rows
        ),
    ]


NOT_RUNNABLE = "* needs tensor parallel across the split, which kvrelay does not move yet"


def table(options: list[Option]) -> list[str]:
    lines = [
        f"{'mode':<15}{'prefill -> decode':<20}{'devices':>10}{'tp':>10}{'batch':>7}{'out tok/s':>11}{'$/h':>8}"
        f"{'$/M out':>9}{'W':>8}{'kWh/M':>7}{'KV GB/s':>9}  bound"
    ]
    for o in options:
        mode = o.mode if o.runnable else f"{o.mode}*"
        names = " -> ".join(pool.hardware.name for pool in o.pools)
        devices = " + ".join(str(pool.devices) for pool in o.pools)
        tp = " + ".join(str(pool.tp) for pool in o.pools)
        lines.append(
            f"{mode:<15}{names:<20}{devices:>10}{tp:>10}{o.batch:>7}{o.output_tokens_per_s:>11,.1f}"
            f"{o.usd_per_hour:>8.2f}{o.usd_per_m_tokens:>9.3f}{o.watts:>8,.0f}{o.kwh_per_m_tokens:>7.3f}"
            f"{o.kv_gb_per_s:>9.2f}  {o.bound}"
        )
    return lines + ([NOT_RUNNABLE] if any(not o.runnable for o in options) else [])


def describe(o: Option) -> str:
    pools = " -> ".join(
        f"{pool.devices} x {pool.hardware.name}" + (f" (engines of {pool.tp})" if pool.tp > 1 else "")
        for pool in o.pools
    )
    return (
        f"{pools}: ${o.usd_per_m_tokens:.3f} and {o.kwh_per_m_tokens:.3f} kWh per million output tokens, "
        f"{o.bound}-bound"
    )


def cache_line(model: ModelSpec, workload: Workload) -> str:
    """The model's cache as the planner counts it (pipeline/engine/family.py)."""
    cache = model.cache
    state = f" + {cache.state_bytes / 2**20:.1f} MiB of state per request" if cache.state_bytes else ""
    return (
        f"{cache.family.value} cache: KV {cache.bytes_per_token:,} B ({cache.bytes_per_token / 2**10:.1f} KiB) per "
        f"token{state}, {cache.request_bytes(workload.prompt_tokens) / 2**20:.1f} MiB per prompt"
    )


def recommend(cfg: PlanConfig) -> list[str]:
    model, devices = cfg.model_spec, catalogue(cfg.hardware)
    workload = load_workload(cfg)
    eff, calibration = calibrate(cfg, model, devices)
    options = Planner(model, workload, eff, cfg.plan).options(devices)
    runnable = [o for o in options if o.runnable]  # colocated ones always are
    best = cheapest(runnable)
    other = next((o for o in runnable if o.mode != best.mode), None)
    job = best.forecast(workload.rows * workload.output_tokens)
    return [
        f"{model.name}: {workload.prompt_tokens:.0f} prompt + {workload.output_tokens:.0f} output tokens per row, "
        f"{workload.rows:,} rows; {cache_line(model, workload)}",
        f"efficiency: prefill {eff.prefill:.3f} of peak FLOP/s, decode {eff.decode:.3f} of peak memory bandwidth, "
        f"network {eff.network:.3f}; KV handoff {eff.handoff:.3f} of a split's prefill busy time",
        *calibration,
        "",
        *table(options),
        "",
        f"recommended: {best.mode} on {describe(best)}",
        *([f"  cheapest {other.mode}: {describe(other)}"] if other else []),
        f"  {workload.rows:,} rows: {job.hours:.2f} h, ${job.usd:,.2f}, {job.kwh:,.2f} kWh",
        "python -m jobs.generate " + " ".join(best.hydra_overrides()),
    ]
