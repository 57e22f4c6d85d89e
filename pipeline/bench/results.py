"""jobs.bench's results for a person: one row per mode, as bench.md (a Markdown table) and
bench.png beside bench.json, and the same across the jobs of a sweep (SweepTable).

A row, for a run of plain vLLM or of the pipeline (a pool's busy seconds are summed over its
workers):

- wall = start-up + processing + tail. Processing runs from the engine pools' first batch start
  to their last batch end (plain vLLM: its generate call); start-up is what comes before it
  (Ray, the actors, loading the engines); the tail is the last rows through detokenize, the
  commits and the report.
- output tokens/s: over the wall time, and over processing; each against plain vLLM's (x plain:
  the whole run, start-up included; x plain, processing: the steady rate a long job approaches).
- a pool's rates: what it does per second while busy, `size · work / busy seconds` (its size,
  the workers it runs at once, not `workers`, which counts a replaced worker too): prefill
  prompt tokens/s and rows/s, decode output tokens/s and rows/s. A colocated pool does both
  phases: its prompt tokens/s, output tokens/s and rows/s stand in both the prefill and the
  decode columns.
- achieved rows/s: rows generated (out, less those with errors) / processing seconds.
- efficiency: achieved rows/s / the slower engine pool's rows/s. 1 when the slower pool is busy
  all through processing; below, the share of it lost to pipeline fill and drain, waiting on
  the other pool, uneven work between its workers, or replacing a worker that died.
- the asymmetry the split exists for (pipeline/job/utilisation.py, pipeline/engine/steps.py):
  the prefill pool's FLOP/s as a share of its peak, the decode pool's memory bytes/s as a share
  of its peak (a colocated pool stands in both), and the decode pool's step times (p50, p99,
  standard deviation) and 99th-percentile inter-token time: how much prefill work stalls decode.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.config import ENGINE_POOLS
from pipeline.job.metrics import JobMetrics, StageMetrics

BENCH_JSON, BENCH_TABLE, BENCH_PLOT = "bench.json", "bench.md", "bench.png"
RUNS = ("plain", "colocated", "disaggregated")  # the modes a bench.json holds, in the order they run


@dataclass
class PlainRun:
    """Plain vLLM's run in bench.json: one engine, all prompts in one generate call."""

    wall_seconds: float
    generate_seconds: float
    rows: int
    output_tokens: int


def parse_run(result: dict) -> JobMetrics | PlainRun:
    """One mode's result in bench.json: a pipeline job's metrics, or plain vLLM's run (each
    beside the bench's own keys: peak RSS, the rounds' rates)."""
    if "stages" in result:
        return JobMetrics.from_dict(result)
    return PlainRun(**{f.name: result[f.name] for f in fields(PlainRun)})


def processing_seconds(run: JobMetrics | PlainRun) -> float:
    """The pipeline's processing window; plain vLLM's generate call."""
    return run.processing_seconds if isinstance(run, JobMetrics) else run.generate_seconds


def output_rates(result: dict) -> tuple[float, float]:
    """Output tokens/s over the wall time and over processing."""
    run = parse_run(result)
    return run.output_tokens / run.wall_seconds, run.output_tokens / processing_seconds(run)


def fastest(rounds: list[dict]) -> dict:
    """A mode's round with the most output tokens/s over processing (a failed round only when
    all failed); each round's rate kept under `rounds_output_tokens_per_s`."""
    ran = [r for r in rounds if "error" not in r]
    if not ran:
        return rounds[0]
    best = max(ran, key=lambda r: output_rates(r)[1])
    return {**best, "rounds_output_tokens_per_s": [round(output_rates(r)[1], 2) for r in ran]}


def mode_row(mode: str, result: dict, plain: dict | None) -> dict:
    """One mode's row from its result in bench.json, against plain vLLM's result."""
    if "error" in result:
        return {"mode": mode, "error": result["error"]}
    run = parse_run(result)
    processing = processing_seconds(run)
    if isinstance(run, JobMetrics):
        startup, rows = run.startup_seconds, run.rows_out - run.rows_errored
        engines = {name: stage for name, stage in run.stages.items() if name in ENGINE_POOLS}
        kv = (run.kv_bytes_per_prompt_token, run.kv_handoff_share_of_prefill, run.object_store_peak_bytes)
    else:  # plain vLLM: one engine, no pools, no object store
        startup, rows, engines, kv = run.wall_seconds - processing, run.rows, {}, (None, None, None)
    rates = {name: stage.rates() for name, stage in engines.items()}
    prefill_pool, decode_pool = (engines.get(name, engines.get("colocated")) for name in ("prefill", "decode"))
    prefill, decode = rates.get("prefill", rates.get("colocated", {})), rates.get("decode", rates.get("colocated", {}))
    slower = min(rates, key=lambda name: rates[name]["rows_per_s"]) if rates else None
    achieved = rows / processing
    wall_rate, processing_rate = output_rates(result)
    plain_wall_rate, plain_processing_rate = output_rates(plain) if plain else (None, None)
    row = {
        "mode": mode,
        "pools": " + ".join(f"{stage.size} {name}" for name, stage in engines.items()) or None,
        "wall_seconds": run.wall_seconds,
        "startup_seconds": startup,
        "processing_seconds": processing,
        "output_tokens_per_s": wall_rate,
        "ratio_to_plain": wall_rate / plain_wall_rate if plain else None,
        "processing_output_tokens_per_s": processing_rate,
        "processing_ratio_to_plain": processing_rate / plain_processing_rate if plain else None,
        "prefill_prompt_tokens_per_s": prefill.get("prompt_tokens_per_s"),
        "prefill_rows_per_s": prefill.get("rows_per_s"),
        "decode_output_tokens_per_s": decode.get("output_tokens_per_s"),
        "decode_rows_per_s": decode.get("rows_per_s"),
        "achieved_rows_per_s": achieved,
        "slower_pool": slower,
        "efficiency": achieved / rates[slower]["rows_per_s"] if slower else None,
        **_engine_cells(prefill_pool, decode_pool),
        "kv_bytes_per_prompt_token": kv[0],
        "kv_handoff_share_of_prefill": kv[1],
        "peak_rss_bytes": result["peak_rss_bytes"],
        "object_store_peak_bytes": kv[2],
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _engine_cells(prefill: StageMetrics | None, decode: StageMetrics | None) -> dict:
    """How compute-bound prefill runs and how bandwidth-bound decode runs (a colocated pool is
    both), and how steady decode's steps and tokens come (pipeline/job/report.py)."""
    share = lambda pool, key: getattr(pool.utilisation, key) if pool and pool.utilisation else None  # noqa: E731
    spread = lambda pool, key, q: getattr(getattr(pool, key), q) if pool and getattr(pool, key) else None  # noqa: E731
    return {
        "prefill_compute_share": share(prefill, "compute_share"),
        "decode_bandwidth_share": share(decode, "bandwidth_share"),
        "decode_step_p50_seconds": spread(decode, "step_seconds", "p50"),
        "decode_step_p99_seconds": spread(decode, "step_seconds", "p99"),
        "decode_step_stddev_seconds": spread(decode, "step_seconds", "stddev"),
        "inter_token_p99_seconds": spread(decode, "inter_token_seconds", "p99"),
    }


def bench_rows(results: dict[str, dict], plain: dict | None = None) -> list[dict]:
    """The rows of one bench run; x plain against its own plain vLLM run unless given one."""
    if plain is None and "plain" in results and "error" not in results["plain"]:
        plain = results["plain"]
    return [mode_row(mode, results[mode], plain) for mode in RUNS if mode in results]


def _number(spec: str, scale: float = 1.0) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v / scale, spec)


COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("mode", "mode", str),
    ("pools", "pools", lambda v: v or "-"),
    ("wall s", "wall_seconds", _number(".1f")),
    ("start-up s", "startup_seconds", _number(".1f")),
    ("processing s", "processing_seconds", _number(".1f")),
    ("output tok/s", "output_tokens_per_s", _number(".1f")),
    ("x plain", "ratio_to_plain", _number(".2f")),
    ("output tok/s, processing", "processing_output_tokens_per_s", _number(".1f")),
    ("x plain, processing", "processing_ratio_to_plain", _number(".2f")),
    ("prefill prompt tok/s", "prefill_prompt_tokens_per_s", _number(".0f")),
    ("prefill rows/s", "prefill_rows_per_s", _number(".2f")),
    ("decode output tok/s", "decode_output_tokens_per_s", _number(".1f")),
    ("decode rows/s", "decode_rows_per_s", _number(".2f")),
    ("achieved rows/s", "achieved_rows_per_s", _number(".2f")),
    ("efficiency", "efficiency", _number(".0%")),
    ("slower pool", "slower_pool", lambda v: v or "-"),
    ("prefill FLOP/s of peak", "prefill_compute_share", _number(".0%")),
    ("decode bytes/s of peak", "decode_bandwidth_share", _number(".0%")),
    ("decode step p50 ms", "decode_step_p50_seconds", _number(".0f", 1e-3)),
    ("p99 ms", "decode_step_p99_seconds", _number(".0f", 1e-3)),
    ("stddev ms", "decode_step_stddev_seconds", _number(".0f", 1e-3)),
    ("inter-token p99 ms", "inter_token_p99_seconds", _number(".0f", 1e-3)),
    ("KV B / prompt token", "kv_bytes_per_prompt_token", _number(",.0f")),
    ("handoff / prefill", "kv_handoff_share_of_prefill", _number(".1%")),
    ("peak RSS GiB", "peak_rss_bytes", _number(".2f", 2**30)),
    ("object store peak MiB", "object_store_peak_bytes", _number(".0f", 2**20)),
]


TEXT = {"run", "mode", "pools", "slower_pool"}  # left-aligned; numbers right


def markdown(rows: list[dict]) -> list[str]:
    """The table, a row per mode (and per run, for a sweep's rows); a mode that could not run
    shows why in place of its pools."""
    columns = ([("run", "run", lambda v: v or "-")] if any("run" in r for r in rows) else []) + COLUMNS
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join("---" if key in TEXT else "--:" for _, key, _ in columns) + "|",
    ]
    for row in rows:
        if "error" in row:
            why = "not run: " + " ".join(row["error"].split()).replace("|", "\\|")
            cells = [
                fmt(row[key]) if key in ("run", "mode") else why if key == "pools" else "-" for _, key, fmt in columns
            ]
        else:
            cells = [fmt(row.get(key)) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], f: BinaryIO) -> None:
    """Output tokens/s per mode (whole run and processing) against plain vLLM's, and each
    engine pool's rows/s while busy against the rows/s achieved."""
    # Imported here, as in the job's report: Agg needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ran = [r for r in rows if "error" not in r]
    labels = [f"{r['run']}\n{r['mode']}" if r.get("run") else r["mode"] for r in ran]
    x = np.arange(len(ran))
    fig = Figure(figsize=(max(7.0, 1.6 * len(ran)), 8), layout="constrained")
    tokens_ax, rows_ax = fig.subplots(2, 1)

    def bars(ax, series: list[tuple[str, str]]) -> None:
        width = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            values = [r[key] if r[key] is not None else np.nan for r in ran]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    bars(tokens_ax, [("output_tokens_per_s", "whole run"), ("processing_output_tokens_per_s", "processing")])
    plain = next((r for r in ran if r["mode"] == "plain"), None)
    if plain:
        tokens_ax.axhline(plain["output_tokens_per_s"], color="black", linewidth=1, label="plain vLLM, whole run")
    tokens_ax.set_ylabel("output tokens/s")
    tokens_ax.legend(fontsize=8)
    bars(
        rows_ax,
        [
            ("prefill_rows_per_s", "prefill pool, busy"),
            ("decode_rows_per_s", "decode pool, busy"),
            ("achieved_rows_per_s", "achieved, processing"),
        ],
    )
    rows_ax.set_ylabel("rows/s")
    rows_ax.set_title("pool rates while busy (colocated: its one pool in both) against the rate achieved", fontsize=9)
    rows_ax.legend(fontsize=8)
    FigureCanvasAgg(fig).print_png(f)


def write(root: Path, results: dict, rows: list[dict]) -> None:
    """bench.json (the results and their rows), bench.md and bench.png in `root`."""
    (root / BENCH_JSON).write_text(json.dumps({**results, "table": rows}, indent=2))
    (root / BENCH_TABLE).write_text("\n".join(markdown(rows)) + "\n")
    with open(root / BENCH_PLOT, "wb") as f:
        plot(rows, f)


def combine(jobs: list[tuple[str, Path | str]]) -> list[dict]:
    """A sweep's rows: each job's, labelled by its run (its overrides), or its failure; x plain
    against the sweep's first plain vLLM run."""
    runs = [(run, json.loads(outcome.read_text()) if isinstance(outcome, Path) else outcome) for run, outcome in jobs]
    plains = [b["plain"] for _, b in runs if isinstance(b, dict) and "error" not in b.get("plain", {"error": None})]
    plain = plains[0] if plains else None
    rows = []
    for run, bench in runs:
        if isinstance(bench, str):
            rows.append({"run": run, "mode": "-", "error": bench})
        else:
            rows += [{"run": run, **row} for row in bench_rows(bench, plain)]
    return rows


class SweepTable(Callback):
    """Hydra callback (conf/bench.yaml): in a sweep (-m), after each job, bench.json, bench.md and
    bench.png across the jobs so far in the sweep's folder (output.path), so that a sweep
    stopped part way still leaves its table. A job's run is named by the overrides the sweep
    varies (pools.decode.size=2)."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.swept: set[str] = set()
        self.jobs: list[tuple[str, Path | str]] = []  # each job's run and its bench.json, or its failure

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.root, self.jobs = Path(config.hydra.sweep.dir), []
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        self.swept = {o.key_or_group for o in overrides if o.is_sweep_override()}

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.root is None:  # a single run: it wrote its own table
            return
        try:
            outcome: Path | str = Path(job_return.return_value)  # jobs.bench returns its bench.json
        except Exception as error:  # a crash: Hydra raises it again once the sweep's jobs have run
            outcome = f"failed: {type(error).__name__}: {error}"
        run = ",".join(o for o in config.hydra.overrides.task if o.lstrip("+~").split("=", 1)[0] in self.swept)
        self.jobs.append((run, outcome))
        runs = [{"run": run, "bench": str(outcome)} for run, outcome in self.jobs]
        write(self.root, {"runs": runs}, combine(self.jobs))
