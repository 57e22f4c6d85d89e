"""Structured config schemas of the benches: a job's config and the bench's own settings,
registered with Hydra's ConfigStore."""

from dataclasses import dataclass, field
from enum import Enum
from typing import List

from hydra.core.config_store import ConfigStore

from pipeline.config import JobConfig, Mode
from pipeline.config import register as register_job
from pipeline.plan.roofline import Efficiency, Hardware, PlanSettings


class BenchMode(str, Enum):
    plain = "plain"  # vLLM's LLM.generate in a process of its own, on every core: the baseline
    colocated = "colocated"
    disaggregated = "disaggregated"


@dataclass
class BenchSettings:
    modes: List[BenchMode] = field(default_factory=lambda: list(BenchMode))
    # In a sweep (-m), plain vLLM and colocated run in its first job only: they do not depend
    # on the prefill:decode split that the sweep varies.
    baselines_once: bool = True
    # The modes run in turn this many times (plain, colocated, disaggregated, plain, ...); each
    # mode's row is its fastest round. A shared machine's noise only ever slows a run down, and
    # taking turns spreads a slow spell over every mode rather than one.
    rounds: int = 1


@dataclass
class BenchConfig(JobConfig):
    """jobs.bench: a job's config, run once per mode."""

    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class OverheadSettings:
    # Dataset sizes, each run through every mode.
    rows: List[int] = field(default_factory=lambda: [20_000, 200_000])
    modes: List[Mode] = field(default_factory=lambda: list(Mode))
    # Per row, a carried text column of this many bytes; the prompts are null but `prompts`
    # of them, so the engines have almost nothing to do and the pipeline's own cost shows.
    text_bytes: int = 2048
    prompts: int = 4


@dataclass
class OverheadConfig(JobConfig):
    """jobs.overhead: a job's config, run per mode and dataset size."""

    overhead: OverheadSettings = field(default_factory=OverheadSettings)


@dataclass
class SharedPrefixSettings:
    rows: int = 256
    # Every prompt is one shared text of at least this many tokens, then words of its own: its
    # tokens after the shared ones (the chat template's closing included) drawn from min to max.
    shared_tokens: int = 1000
    unique_tokens_min: int = 50
    unique_tokens_max: int = 150
    # Different shared texts, row i taking text i % prefixes: interleaved, so that with several
    # workers a pool's blocks of rows hold every text unless rows are ordered by prefix.
    prefixes: int = 1
    # The lifetime pair: this many rows over this many texts, then 10 times both.
    lifetime_rows: int = 64
    lifetime_prefixes: int = 4
    seed: int = 0


@dataclass
class SharedPrefixConfig(JobConfig):
    """jobs.shared_prefix: a job's config, run colocated and disaggregated with and without
    shared blocks."""

    shared_prefix: SharedPrefixSettings = field(default_factory=SharedPrefixSettings)


@dataclass
class AdviseSettings:
    # Input rows run side by side: a seeded choice spread over the whole input (every row of a
    # smaller one), the same on every run with the same seed.
    sample_rows: int = 512
    seed: int = 0
    # A split that saves less than this share of colocated's $ per output token does not pay
    # for its second pool and the KV it moves.
    min_saving: float = 0.05
    # A job too small to keep plan.max_devices GPUs busy well past their engines' start-up
    # (loading the weights, capturing CUDA graphs) is planned on fewer: the most whose start-up
    # stays within startup_share of the run (at least a split's two engines).
    gpu_startup_s: float = 300.0
    startup_share: float = 0.1


@dataclass
class AdviseConfig(BenchConfig):
    """jobs.advise: the user's job config (model, sampling, input), run on a sample of its input
    as the bench runs it, and the planner's catalogue, settings and GPU efficiencies."""

    advise: AdviseSettings = field(default_factory=AdviseSettings)
    # The catalogue entry of the machine the sample runs on, one (hardware@machine=cpu-core):
    # its measured efficiencies calibrate the planner for it alone.
    machine: dict[str, Hardware] = field(default_factory=dict)
    # The hardware to advise on, planned with `efficiency` (typical of vLLM on GPUs).
    hardware: dict[str, Hardware] = field(default_factory=dict)
    efficiency: Efficiency = field(default_factory=Efficiency)
    plan: PlanSettings = field(default_factory=PlanSettings)


def register() -> None:
    register_job()
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    ConfigStore.instance().store(name="overhead_schema", node=OverheadConfig)
    ConfigStore.instance().store(name="shared_prefix_schema", node=SharedPrefixConfig)
    ConfigStore.instance().store(name="advise_schema", node=AdviseConfig)
