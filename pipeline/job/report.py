"""The report a job writes beside _metrics.json, for a person rather than a program: _report.md
(what ran, how busy each pool and each worker was and which pool held the job back, errors, the
KV handoff) and _report.png (rows through each stage and output tokens/s over time). Written
through the output's filesystem, so it lands wherever the rows do (local, s3://, ...), before
_SUCCESS."""

from typing import BinaryIO

import numpy as np

from pipeline.config import ENGINE_POOLS
from pipeline.io.output import OutputTarget
from pipeline.io.storage import REPORT, REPORT_PLOT, filesystem
from pipeline.job.meter import BatchPoint
from pipeline.job.metrics import JobMetrics, StageMetrics


def write_report(output: OutputTarget, metrics: JobMetrics, plotted: bool) -> None:
    """_report.md; `plotted` says _report.png is beside it (write_plot)."""
    with output.fs.open(f"{output.root}/{REPORT}", "w") as f:
        f.write("\n".join(report_lines(metrics, plotted)) + "\n")


def write_plot(url: str, timeline: list[BatchPoint]) -> None:
    """_report.png at `url` (an fsspec URL): a job draws it in a Ray task, as the workers write
    every other file of the output, so matplotlib's import and drawing (~1 s of CPU) stay off
    the driver."""
    fs, _, path = filesystem(url)
    with fs.open(path, "wb") as f:
        plot(timeline, f)


def busy_share(stage: StageMetrics, wall: float) -> float:
    """The fraction of the job's wall time the pool's workers spent on batches (a pool's size is
    the workers it runs at once; `workers` counts a replaced one too)."""
    return stage.busy_seconds / (wall * stage.size) if wall else 0.0


def report_lines(m: JobMetrics, plotted: bool) -> list[str]:
    wall = m.wall_seconds
    lines = [
        f"# kvrelay {m.mode} {m.phase} run of {m.model}",
        "",
        f"- rows: {m.rows_in} in, {m.rows_out} out, {m.rows_errored} with errors",
        f"- shards: {m.shards.total}, {m.shards.resumed} committed by an earlier run",
        f"- tokens: {m.input_tokens} in, {m.output_tokens} out",
        f"- wall: {wall:.1f} s, {m.output_tokens_per_second:.1f} output tokens/s",
        "",
        "## Pools",
        "",
    ]
    if m.stages:
        lines += _pool_table(m.stages, wall) + ["", "### Workers", ""] + _worker_table(m.stages)
    else:
        lines.append("No pool ran: every shard was committed by an earlier run.")
    engines = {name: s for name, s in m.stages.items() if name in ENGINE_POOLS}
    if engines:
        lines += ["", "## Engine pools: utilisation and step times", ""] + _engine_lines(engines)
    lines += ["", "## Errors", ""]
    errors = sorted(m.errors.items(), key=lambda kv: (-kv[1], kv[0]))
    lines += [f"- `{kind}`: {count}" for kind, count in errors] or ["No row errors."]
    lines += ["", "## KV handoff and memory", ""] + _kv_lines(m)
    if plotted:
        lines += ["", f"![rows through each stage and output tokens/s over time]({REPORT_PLOT})"]
    return lines


def _pool_table(stages: dict[str, StageMetrics], wall: float) -> list[str]:
    shares = {name: busy_share(s, wall) for name, s in stages.items()}
    lines = [
        "| pool | workers | busy s | busy share | rows | input tokens | output tokens | rows / worker | tokens / worker |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, s in stages.items():
        n, tokens = s.workers, s.input_tokens + s.output_tokens
        lines.append(
            f"| {name} | {n} | {s.busy_seconds:.1f} | {shares[name]:.0%} | {s.rows} | {s.input_tokens} "
            f"| {s.output_tokens} | {s.rows / n:.0f} | {tokens / n:.0f} |"
        )
    lines += ["", "Busy share: busy seconds / (wall seconds · pool size); the wall includes start-up."]
    engines = {name: share for name, share in shares.items() if name in ENGINE_POOLS}
    if engines:
        pool = max(engines, key=engines.get)
        lines += ["", f"Bottleneck: the {pool} pool, its workers busy {engines[pool]:.0%} of the wall time."]
    return lines


def _worker_table(stages: dict[str, StageMetrics]) -> list[str]:
    """Each worker's share: on a cluster, where each pool's work ran (a worker is named by the
    first characters of its Ray node id and its pid)."""
    lines = [
        "| pool | worker | batches | busy s | rows | input tokens | output tokens |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for name, s in stages.items():
        lines += [
            f"| {name} | {w.worker} | {w.batches} | {w.busy_seconds:.1f} | {w.rows} | {w.input_tokens} "
            f"| {w.output_tokens} |"
            for w in s.per_worker
        ]
    return lines


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _engine_lines(stages: dict[str, StageMetrics]) -> list[str]:
    """Per engine pool: FLOP/s and memory bytes/s per worker while busy against its peak, and
    the distributions of step times and of the gaps between a request's tokens."""
    lines = [
        "| pool | device | GFLOP/s | of peak | GB/s | of peak | FLOP / byte | ridge |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, s in stages.items():
        u = s.utilisation
        if u is None:
            lines.append(f"| {name} | - | - | - | - | - | - | - |")
            continue
        ridge = "-" if u.ridge is None else f"{u.ridge:.0f}"
        lines.append(
            f"| {name} | {u.device} | {u.flops_per_s / 1e9:,.1f} | {_share(u.compute_share)} "
            f"| {u.bytes_per_s / 1e9:,.2f} | {_share(u.bandwidth_share)} | {u.intensity:,.0f} | {ridge} |"
        )
    lines += [
        "",
        "Per worker while busy: the model's FLOPs and memory bytes (weights read once per engine step, the "
        "cache's reads and writes) over the pool's busy seconds, against one worker's peak (a GPU's datasheet; "
        "CPU cores measured on this machine). A pool whose FLOPs per byte sit above the ridge is compute-bound, "
        "below it bandwidth-bound.",
        "",
        "| pool | steps | step p50 ms | p90 | p99 | stddev | inter-token p50 ms | p90 | p99 | stddev |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, s in stages.items():
        step, gap = s.step_seconds, s.inter_token_seconds
        cells = [_ms(getattr(d, k, None)) for d in (step, gap) for k in ("p50", "p90", "p99", "stddev")]
        lines.append(f"| {name} | {s.engine_steps} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A step is one call of the engine: a forward pass over every running sequence (and the prompt chunks "
        "scheduled with them). The inter-token time is the gap between one request's successive tokens: where "
        "prefill shares the engine, decode waits behind it.",
    ]
    return lines


def _kv_lines(m: JobMetrics) -> list[str]:
    lines = []
    if m.kv_bytes_moved:
        lines.append(
            f"- KV moved: {m.kv_bytes_moved / 2**20:.1f} MiB, {m.kv_bytes_per_prompt_token:.0f} B per prompt token"
        )
        if m.kv_blocks_referenced:
            lines.append(
                f"- shared prefixes: rows named {m.kv_blocks_referenced} shared KV blocks, {m.kv_blocks_stored} "
                f"stored, {m.kv_blocks_fetched} fetched by decode workers; {m.kv_bytes_saved / 2**20:.1f} MiB "
                "did not move"
            )
        share = m.kv_handoff_share_of_prefill
        lines.append(
            f"- handoff: {m.kv_handoff_seconds:.1f} s"
            + (f", {share:.1%} of the prefill pool's busy time" if share is not None else "")
        )
        lines.append(f"- prefill recomputed by the decode pool: {m.kv_recomputed_rows} rows")
    lines.append(f"- object store peak: {m.object_store_peak_bytes / 2**20:.1f} MiB")
    return lines


def output_rate(timeline: list[BatchPoint], points: int = 200) -> tuple[np.ndarray, np.ndarray, float]:
    """Output tokens/s over the run, averaged over a rolling window of a twentieth of it (at
    least a second). Each engine batch's tokens are spread evenly over the seconds it ran, so a
    large batch shows as the work it was, not as a spike at its end."""
    engine = [p for p in timeline if p.stage in ENGINE_POOLS]
    ends = np.array([p.end for p in engine])
    per_second = np.array([p.output_tokens / max(p.seconds, 1e-3) for p in engine])
    # Tokens done by time t is piecewise linear: its slope rises by a batch's rate at its start
    # and falls back at its end (a knot at 0 keeps it defined without engine batches).
    knots = np.concatenate([[0.0], ends - np.array([p.seconds for p in engine]), ends])
    order = np.argsort(knots, kind="stable")
    knots, slope = knots[order], np.cumsum(np.concatenate([[0.0], per_second, -per_second])[order])
    done = np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(knots))])
    last = max(p.end for p in timeline)
    window = max(last / 20, 1.0)
    times = np.linspace(0.0, last, points)
    # Near the start the window reaches back before the run: average over what there is.
    span = np.clip(times, 1e-9, window)
    return times, (np.interp(times, knots, done) - np.interp(times - span, knots, done)) / span, window


def plot(timeline: list[BatchPoint], f: BinaryIO) -> None:
    # Imported here: only the driver draws, once per job; Agg needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), layout="constrained")
    rows_ax, rate_ax = fig.subplots(2, 1, sharex=True)
    for stage in dict.fromkeys(p.stage for p in timeline):  # in the order stages first finished a batch
        points = sorted((p for p in timeline if p.stage == stage), key=lambda p: p.end)
        ends, done = [0.0] + [p.end for p in points], np.cumsum([0] + [p.rows for p in points])
        rows_ax.step(ends, done, where="post", label=stage)
    rows_ax.set_ylabel("rows done")
    rows_ax.legend(loc="upper left")
    times, rate, window = output_rate(timeline)
    rate_ax.plot(times, rate)
    rate_ax.set_ylabel(f"output tokens/s\n(rolling {window:.0f} s)")
    rate_ax.set_xlabel("seconds since the pipeline started")
    for ax in (rows_ax, rate_ax):
        ax.grid(alpha=0.3)
    FigureCanvasAgg(fig).print_png(f)
