"""The ways to run the whole job that jobs.advise weighs (pipeline/bench/advise.py runs the
sample): each with its throughput, hours, $ and kWh, the one to run, and the jobs.generate
command that runs it. Whether the split pays, and why, is pipeline/bench/verdict.py.

Two kinds of figures, never mixed within a row. The machine at hand's are measured: the sample's
runs as they took, then each further row of the input at the rate the run's slower engine pool
kept while busy (`SampleRun`). Every other device's are the planner's steady state on the input's workload
(pipeline/plan/roofline.py), with the configured efficiencies: the sample measured this
machine's, not a GPU's."""

import math
import shlex
from dataclasses import dataclass

from pipeline.config import ENGINE_POOLS
from pipeline.job.metrics import JobMetrics
from pipeline.plan.roofline import Efficiency, Forecast, Hardware, ModelSpec, Option, PlanSettings, cheapest

MEASURED, PLANNED = "measured", "planned"


OUTPUT = "<OUTPUT>"
# The command line's keys that say what the job is, not where it runs: every command repeats
# them. The machine at hand's command repeats where it ran as well.


JOB_KEYS = ("model", "sampling", "input", "kv")


HERE_KEYS = ("engine", "pools", "cluster")


@dataclass(frozen=True)
class Identity:
    rows: int  # compared, by id
    differing: list[str]  # the ids whose tokens or errors differ

    @property
    def identical(self) -> bool:
        return not self.differing


@dataclass(frozen=True)
class MachineRun:
    """The bench of the sample on the machine at hand, and the planner's settings for it."""

    hardware: Hardware
    results: dict  # bench.json
    cores: int  # those the engines ran on: on CPU, devices of the catalogue entry
    spec: ModelSpec  # the model as it ran here
    efficiency: Efficiency  # calibrated on the disaggregated run
    settings: PlanSettings
    plain_skipped: str | None  # why plain vLLM did not run


@dataclass(frozen=True)
class Choice:
    """One way to run the whole job."""

    hardware: str  # the device; a split's prefill -> decode devices
    mode: str  # plain (vLLM's LLM.generate, for reference), colocated or disaggregated
    pools: str
    p_d: str | None  # a split's prefill:decode engines
    output_tokens_per_s: float  # over the whole job
    forecast: Forecast
    bound: str  # what limits it: prefill, decode or network
    basis: str  # measured here, or planned
    overrides: tuple[str, ...] | None  # for jobs.generate; None: not a kvrelay job
    option: Option | None = None  # the planner's figures behind it (for the machine: calibrated)

    @property
    def usd_per_m_tokens(self) -> float:
        return self.forecast.usd / (self.output_tokens_per_s * self.forecast.hours * 3600) * 1e6


@dataclass(frozen=True)
class SampleRun:
    """One mode's run of the sample, as the whole job extends it: its engine pools' cores,
    sizes and busy shares, and the seconds each further row adds."""

    wall: float
    processing: float
    rows: int
    cores: dict[str, int]  # by pool
    sizes: dict[str, int]
    load: dict[str, float]  # busy share over the sample's processing
    steady: dict[str, float]  # busy share while the slower pool is always busy
    per_row: float

    @classmethod
    def of(cls, result: dict, *, cores: int, rows: int) -> "SampleRun":
        """From bench.json; `rows`: the sample's, those refused before an engine (an overlong
        prompt) too, which take no engine time. Plain vLLM (one engine on every core, one generate
        call) goes on at its call's rate, a pipeline at its slower engine pool's while busy: its
        fill and drain, like its start-up, come once per job (a short sample's efficiency is not
        the job's)."""
        if "stages" not in result:
            processing, plain = result["generate_seconds"], {"plain": 1.0}
            return cls(
                wall=result["wall_seconds"],
                processing=processing,
                rows=rows,
                cores={"plain": cores},
                sizes={"plain": 1},
                load=plain,
                steady=plain,
                per_row=processing / rows,
            )
        metrics = JobMetrics.from_dict(result)
        engines = {name: s for name, s in metrics.stages.items() if name in ENGINE_POOLS}
        busy = {name: s.busy_seconds / s.size for name, s in engines.items()}  # a worker's, for the sample
        slowest = max(busy.values())
        return cls(
            wall=metrics.wall_seconds,
            processing=metrics.processing_seconds,
            rows=rows,
            cores={name: len(s.cores) for name, s in engines.items()},
            sizes={name: s.size for name, s in engines.items()},
            load={name: min(1.0, b / metrics.processing_seconds) for name, b in busy.items()},
            steady={name: b / slowest for name, b in busy.items()},
            per_row=slowest / rows,
        )

    def watts(self, hw: Hardware, load: dict[str, float]) -> float:
        """Each pool's cores at idle watts plus their busy share of the step to busy."""
        return sum(n * (hw.idle_watts + (hw.busy_watts - hw.idle_watts) * load[name]) for name, n in self.cores.items())


def measured(mode: str, run: MachineRun, total_rows: int, bound: str) -> Choice:
    """A mode of the sample's bench, extended to the input's `total_rows`: the sample's run as
    measured, then each further row at its rate. The cores draw busy watts through start-up
    (imports, loading the engines) and the tail."""
    rows = run.results["colocated"]["rows_in"]  # the sample's
    hw, sample = run.hardware, SampleRun.of(run.results[mode], cores=run.cores, rows=rows)
    used = min(sum(sample.cores.values()), run.cores)
    more = (total_rows - sample.rows) * sample.per_row
    seconds = sample.wall + more
    joules = (
        (sample.wall - sample.processing) * used * hw.busy_watts
        + sample.processing * sample.watts(hw, sample.load)
        + more * sample.watts(hw, sample.steady)
    )
    tokens = run.results[mode]["output_tokens"] * total_rows / sample.rows
    n = sample.sizes
    return Choice(
        hardware=hw.name,
        mode=mode,
        pools=" + ".join(f"{n[name]} {name} ({c} core{'s' if c > 1 else ''})" for name, c in sample.cores.items()),
        p_d=f"{n['prefill']}:{n['decode']}" if mode == "disaggregated" else None,
        output_tokens_per_s=tokens / seconds,
        forecast=Forecast(hours=seconds / 3600, usd=seconds / 3600 * used * hw.usd_per_hour, kwh=joules / 3.6e6),
        bound=bound,
        basis=MEASURED,
        overrides=None if mode == "plain" else (f"mode={mode}",),
    )


def planned(option: Option, output_tokens: float) -> Choice:
    """A planner's option for a job of `output_tokens`."""
    pools = " + ".join(
        f"{p.devices} {p.hardware.name}" + (f" (engines of {p.tp})" if p.tp > 1 else "") for p in option.pools
    )
    split = option.mode == "disaggregated"
    return Choice(
        hardware=" -> ".join(p.hardware.name for p in option.pools),
        mode=option.mode,
        pools=pools,
        p_d=f"{option.pools[0].engines}:{option.pools[1].engines}" if split else None,
        output_tokens_per_s=option.output_tokens_per_s,
        forecast=option.forecast(output_tokens),
        bound=option.bound,
        basis=PLANNED,
        overrides=tuple(option.hydra_overrides()),
        option=option,
    )


def per_device(options: list[Option], devices: list[Hardware]) -> list[Option]:
    """On each device: the cheapest colocated option kvrelay runs, and the cheapest split whose
    prefill runs on it (its decode on any of `devices`)."""
    picks = []
    for hw in devices:
        for mode in ("colocated", "disaggregated"):
            mine = [o for o in options if o.runnable and o.mode == mode and o.pools[0].hardware.name == hw.name]
            picks += [cheapest(mine)] if mine else []
    return picks


def decide(choices: list[Choice], min_saving: float, identical: bool) -> tuple[Choice, Choice, Choice | None]:
    """The choice to run, and the cheapest colocated and split ones it is picked from: the split
    when it saves at least `min_saving` of colocated's cost and its tokens are colocated's."""
    runnable = [c for c in choices if c.overrides is not None]
    colocated = min((c for c in runnable if c.mode == "colocated"), key=lambda c: c.forecast.usd)
    split = min((c for c in runnable if c.mode == "disaggregated"), key=lambda c: c.forecast.usd, default=None)
    pays = split is not None and identical and split.forecast.usd < (1 - min_saving) * colocated.forecast.usd
    return (split if pays else colocated), colocated, split


def user_overrides(task: list[str], here: bool) -> list[str]:
    """The command line's overrides that every command repeats (input.path aside: the command
    names it); `here`: those of where the sample ran too."""
    keys = JOB_KEYS + (HERE_KEYS if here else ())

    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0]

    return [o for o in task if key(o).split(".")[0] in keys and key(o) != "input.path"]


def command(input_path: str, task: list[str], choice: Choice) -> str:
    """The jobs.generate command that runs `choice` on the input; output.path is the user's to name."""
    assert choice.overrides is not None, "plain vLLM is not a kvrelay job"
    own = {o.split("=", 1)[0] for o in choice.overrides}
    user = [o for o in user_overrides(task, choice.basis == MEASURED) if o.lstrip("+~").split("=", 1)[0] not in own]
    words = [f"input.path={input_path}", *user, *choice.overrides]
    return " ".join(
        ["python -m jobs.generate", *map(shlex.quote, words[:1]), f"output.path={OUTPUT}", *map(shlex.quote, words[1:])]
    )


def sig(value: float) -> str:
    """Three significant digits, without an exponent."""
    if not value:
        return "0"
    return f"{value:,.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"
