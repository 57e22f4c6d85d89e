"""_advice.md: jobs.advise's answer for a person (also printed), from the figures of
_advice.json (pipeline/bench/advice_report.py): the input and its sample, what was measured
here, every option for the whole job, the recommendation and the command."""

from pipeline.bench.advice import PLANNED, Choice, MachineRun, sig
from pipeline.bench.config import AdviseConfig
from pipeline.bench.results import COLUMNS
from pipeline.bench.verdict import Verdict


def duration(hours: float) -> str:
    seconds = hours * 3600
    return f"{sig(seconds)} s" if seconds < 60 else f"{sig(seconds / 60)} min" if seconds < 3600 else f"{sig(hours)} h"


SHORT_JOB = (
    "At this size a planned run is over in less time than its engines take to start on GPUs (minutes: loading "
    "the weights, capturing CUDA graphs), which the planner does not count: fixed costs decide what so small a job "
    "costs there; the rates ($ per million output tokens) are what carry over to a larger input."
)


MEASURED_COLUMNS = {
    "mode",
    "pools",
    "startup_seconds",
    "processing_seconds",
    "processing_output_tokens_per_s",
    "prefill_rows_per_s",
    "decode_rows_per_s",
    "efficiency",
    "kv_handoff_share_of_prefill",
}


def measured_table(rows: list[dict]) -> list[str]:
    columns = [c for c in COLUMNS if c[1] in MEASURED_COLUMNS]
    return [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join("---" if key in ("mode", "pools") else "--:" for _, key, _ in columns) + "|",
        *("| " + " | ".join(fmt(row.get(key)) for _, key, fmt in columns) + " |" for row in rows),
    ]


def options_table(choices: list[Choice], chosen: Choice) -> list[str]:
    lines = [
        "| hardware | layout | pools | P:D | output tok/s | $ / M output tokens | time | $ | kWh | bound | basis |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for c in choices:
        layout = f"**{c.mode}**" if c is chosen else c.mode if c.overrides is not None else "plain vLLM (reference)"
        f = c.forecast
        lines.append(
            f"| {c.hardware} | {layout} | {c.pools} | {c.p_d or '-'} | {sig(c.output_tokens_per_s)} | "
            f"{sig(c.usd_per_m_tokens)} | {duration(f.hours)} | {sig(f.usd)} | {sig(f.kwh)} | {c.bound} | {c.basis} |"
        )
    return lines


def text(figures: dict, cfg: AdviseConfig, run: MachineRun, choices: list[Choice], verdict: Verdict) -> list[str]:
    """_advice.md: the input and the sample, what was measured here, every option for the whole
    job, the recommendation."""
    return [
        *header(figures, cfg),
        *measured_here(figures, cfg, run),
        *whole_job(figures, cfg, run, choices, verdict),
        *recommendation(figures, run, verdict),
    ]


def header(figures: dict, cfg: AdviseConfig) -> list[str]:
    model, sample, total = figures["model"], figures["sample"], figures["input"]["rows"]
    spread = (
        f"all {total:,} rows"
        if sample["rows"] == total
        else f"{sample['rows']:,} rows, one from each 1/{sample['rows']} of the input (advise.seed={sample['seed']})"
    )
    return [
        f"# jobs.advise: {cfg.input.path}",
        "",
        f"{total:,} rows; {model['name']}: {model['params'] / 1e6:,.1f}M parameters, {model['cache_family']} cache of "
        f"{model['kv_bytes_per_token']['gpu']:,} B per token on GPUs ({model['kv_bytes_per_token']['here']:,} B here). "
        f"Sample: {spread}: {sample['path']}",
        "",
    ]


def identity_line(ident: dict) -> str:
    if ident["identical"]:
        return (
            f"Identity: the disaggregated run's tokens equal the colocated run's on all {ident['rows_compared']} rows."
        )
    more = ", ..." if ident["rows_differing"] > 10 else ""
    return (
        f"**NOT IDENTICAL: {ident['rows_differing']} of {ident['rows_compared']} rows differ between the colocated and "
        f"the disaggregated run (ids: {', '.join(ident['differing_ids'][:10])}{more}). Do not migrate to the split "
        "until they match.**"
    )


def measured_here(figures: dict, cfg: AdviseConfig, run: MachineRun) -> list[str]:
    eff, predicted = run.efficiency, figures["measured"]["predicted_by_calibrated_planner"]
    rows, rate = {r["mode"]: r for r in figures["measured"]["modes"]}, "processing_output_tokens_per_s"
    return [
        f"## Measured here: {run.hardware.name}, {run.cores} cores",
        "",
        *measured_table(figures["measured"]["modes"]),
        "",
        *([f"Plain vLLM not run: {run.plain_skipped}."] if run.plain_skipped else []),
        identity_line(figures["identity"]),
        "",
        f"Calibrated on the disaggregated run: prefill at {eff.prefill:.3f} of {run.hardware.name}'s peak FLOP/s, "
        f"decode at {eff.decode:.3f} of its peak memory bandwidth, the handoff {eff.handoff:.1%} of prefill. So "
        f"calibrated, the planner gives {predicted['colocated']:.1f} output tok/s colocated and "
        f"{predicted['disaggregated']:.1f} disaggregated here, against {rows['colocated'][rate]:.1f} and "
        f"{rows['disaggregated'][rate]:.1f} measured while processing. The other hardware is planned with the "
        f"configured efficiencies (prefill {cfg.efficiency.prefill:g}, decode {cfg.efficiency.decode:g}, network "
        f"{cfg.efficiency.network:g}: typical of vLLM on GPUs), not this machine's.",
        "",
    ]


def whole_job(figures: dict, cfg: AdviseConfig, run: MachineRun, choices: list[Choice], verdict: Verdict) -> list[str]:
    w, hw, total = figures["workload"], run.hardware, figures["input"]["rows"]
    short = verdict.chosen.basis == PLANNED and verdict.chosen.forecast.hours < 0.1
    return [
        f"## The whole job: {total:,} rows"
        + (f", {w['rows']:,} of which generate (the sample's share)" if w["rows"] != total else "")
        + f", of {w['prompt_tokens']:,.0f} prompt and {w['output_tokens']:,.1f} output tokens (the sample's means): "
        f"{w['output_tokens_total']:,.0f} output tokens",
        "",
        *options_table(choices, verdict.chosen),
        "",
        "Measured rows: the sample's runs as they took, then each further row at the rate of the run's slower engine "
        f"pool while busy (plain vLLM: its generate call's), on the cores used at ${hw.usd_per_hour:g}/h and "
        f"{hw.idle_watts:g}-{hw.busy_watts:g} W each. "
        f"Planned rows: the steady state on up to {figures['planned_max_devices']} devices per option "
        f"(plan.max_devices={cfg.plan.max_devices}; fewer where the job would not keep them busy well past their "
        f"start-up: advise.gpu_startup_s={cfg.advise.gpu_startup_s:g} s at most advise.startup_share="
        f"{cfg.advise.startup_share:.0%} of the run), start-up not counted. Energy: the devices' alone.",
        *(["", SHORT_JOB] if short else []),
        "",
    ]


def recommendation(figures: dict, run: MachineRun, verdict: Verdict) -> list[str]:
    chosen, here = figures["recommendation"], figures["here"]
    ratio = f" (P:D {chosen['p_d']})" if chosen["p_d"] else ""
    where = chosen["pools"] if chosen["basis"] == PLANNED else f"this machine ({chosen['hardware']}: {chosen['pools']})"
    return [
        "## Recommendation",
        "",
        *([identity_line(figures["identity"]), ""] if not figures["identity"]["identical"] else []),
        f"**{chosen['mode']} on {where}**{ratio}: {duration(chosen['hours'])}, ${sig(chosen['usd'])}, "
        f"{sig(chosen['kwh'])} kWh for the whole job (${sig(chosen['usd_per_m_tokens'])} per million output tokens, "
        f"{chosen['basis']}).",
        "",
        verdict.pays + (":" if verdict.reasons else "."),
        *(f"- {reason}" for reason in verdict.reasons),
        "",
        "Run it:",
        "",
        f"    {chosen['command']}",
        *(
            ["", f"Here ({run.hardware.name}), as measured, {here['mode']}:", "", f"    {here['command']}"]
            if here["basis"] != chosen["basis"]
            else []
        ),
    ]
