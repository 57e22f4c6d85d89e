"""Structured config schema of `jobs.plan`, registered with Hydra's ConfigStore."""

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.plan.roofline import Efficiency, Hardware, ModelSpec, PlanSettings


@dataclass
class WorkloadConfig:
    # Mean tokens per row, or a Parquet dataset that gives them (see Workload.from_parquet):
    # a dataset replaces prompt_tokens and rows, and output_tokens when it is a kvrelay output.
    prompt_tokens: float = 2048
    output_tokens: float = 256
    rows: int = 100_000
    path: Optional[str] = None
    prompt_column: str = "prompt"
    tokenizer: Optional[str] = None


@dataclass
class CalibrationConfig:
    # A jobs.bench result (bench.json) to measure the prefill and decode efficiency factors on.
    bench: Optional[str] = None
    # The catalogue entry it ran on; may be left out when one hardware entry is selected.
    hardware: Optional[str] = None


@dataclass
class PlanConfig:
    model_spec: ModelSpec = MISSING
    hardware: dict[str, Hardware] = field(default_factory=dict)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    efficiency: Efficiency = field(default_factory=Efficiency)
    plan: PlanSettings = field(default_factory=PlanSettings)
    calibrate: CalibrationConfig = field(default_factory=CalibrationConfig)


def register() -> None:
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)
