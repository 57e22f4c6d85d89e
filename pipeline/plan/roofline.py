"""Capacity planner: a roofline model of prefill, decode and the KV transfer between them, which
predicts throughput and cost of colocated and disaggregated runs on each hardware mix and picks
the cheapest per output token.

Per device, with efficiency factors scaling the datasheet peaks (see `Efficiency`):

- prefill is compute-bound: prompt tokens/s = eff.prefill · FLOP/s / (2 · params). The attention
  FLOPs (~4 · layers · hidden · context per token) are left out: a few % at 2k tokens for 8B.
- decode is bandwidth-bound: each step reads the weights once and the KV of every sequence in
  the batch, at its mean context (prompt + output / 2). The batch is what fits in memory next to
  the weights, capped at `PlanSettings.max_batch`. Output tokens/s = batch / step, step =
  (weight bytes + batch · KV bytes per sequence) / (eff.decode · memory bandwidth). Its compute
  term is left out (far below the memory term at these batch sizes on GPUs).
- the KV of a prompt (prompt tokens · KV bytes per token) crosses the network once, at
  eff.network · NIC bandwidth, on each side of the link.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

from omegaconf import MISSING

from pipeline.engine.model import kv_bytes_per_token, load_tokenizer
from pipeline.errors import JobError
from pipeline.job.metrics import JobMetrics, StageMetrics

GB = 1e9


@dataclass
class ModelSpec:
    name: str = MISSING
    params: float = MISSING
    layers: int = MISSING
    kv_heads: int = MISSING
    head_dim: int = MISSING
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.dtype_bytes)


@dataclass
class Hardware:
    """One device of a catalogue entry (conf/hardware/): dense peak FLOP/s at the model's
    dtype, memory bandwidth and size, price."""

    name: str = ""  # the catalogue key
    device: str = "cuda"  # engine.device for jobs.generate
    tflops: float = MISSING
    mem_bw_gbs: float = MISSING
    mem_gib: float = MISSING
    usd_per_hour: float = MISSING
    # Network between this device and the other pool; None: PlanSettings.network_gbps.
    nic_gbps: Optional[float] = None


@dataclass
class Efficiency:
    """Fractions of peak reached: FLOP/s in prefill, memory bandwidth in decode, network in
    the KV transfer. The defaults are typical of vLLM on GPUs; `from_bench` measures them."""

    prefill: float = 0.5
    decode: float = 0.6
    network: float = 0.7

    @classmethod
    def from_bench(
        cls, path: str, hardware: Hardware, model: ModelSpec, settings: "PlanSettings", network: float = 0.7
    ) -> "Efficiency":
        """The factors with which this model reproduces the prefill and decode stage rates of a
        `jobs.bench` result measured on `hardware` (its disaggregated run, which times each
        phase on its own pool). A stage's busy seconds are summed over its workers; on CPU each
        core a worker was bound to is a device, on GPUs each worker is one. The network factor
        is kept: the bench moves KV in memory."""
        run = JobMetrics.from_dict(load_bench(path)["disaggregated"])

        def device_seconds(stage: StageMetrics) -> float:
            cores = [len(c) for c in stage.worker_cores]
            return stage.busy_seconds * (sum(cores) / len(cores) if hardware.device == "cpu" else 1)

        peak = Planner(model, Workload.from_metrics(run), cls(1.0, 1.0, network), settings)
        prefill = run.input_tokens / device_seconds(run.stages["prefill"]) / peak.prefill_rate(hardware)
        decode = run.output_tokens / device_seconds(run.stages["decode"]) / peak.decode_rate(hardware)
        return cls(prefill, decode, network)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: float  # means per row
    output_tokens: float
    rows: int

    @classmethod
    def from_metrics(cls, metrics: JobMetrics) -> "Workload":
        """From a kvrelay job's metrics."""
        rows = metrics.rows_out - metrics.rows_errored
        return cls(metrics.input_tokens / rows, metrics.output_tokens / rows, rows)

    @classmethod
    def from_parquet(
        cls,
        url: str,
        prompt_column: str = "prompt",
        tokenizer: Optional[str] = None,
        output_tokens: Optional[float] = None,
    ) -> "Workload":
        """Prompt lengths and row count of a Parquet dataset. A kvrelay output carries
        num_input_tokens and num_generated_tokens (rows with an error are left out); otherwise
        prompts are counted (token-id lists as they are, text with `tokenizer`, an HF tokenizer
        path or hub id) and `output_tokens` is the mean output length."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipeline.columns import ERROR, NUM_GENERATED_TOKENS, NUM_INPUT_TOKENS
        from pipeline.io.storage import parquet_dataset

        try:
            dataset = parquet_dataset(url)
        except FileNotFoundError:
            raise JobError(f"workload.path {url} does not exist") from None
        names = dataset.schema.names
        if NUM_INPUT_TOKENS in names and NUM_GENERATED_TOKENS in names:
            table = dataset.to_table(columns=[NUM_INPUT_TOKENS, NUM_GENERATED_TOKENS, *{ERROR} & set(names)])
            if ERROR in names:
                table = table.filter(pc.is_null(table[ERROR]))
            mean = lambda column: pc.mean(table[column]).as_py()  # noqa: E731
            return cls(mean(NUM_INPUT_TOKENS), mean(NUM_GENERATED_TOKENS), table.num_rows)
        if prompt_column not in names:
            raise JobError(f"workload.path {url} has no column '{prompt_column}' (columns: {', '.join(names)})")
        if output_tokens is None:
            raise JobError("workload.output_tokens is needed: the dataset has no num_generated_tokens column")
        prompts = dataset.to_table(columns=[prompt_column])[prompt_column].drop_null()
        if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
            if not tokenizer:
                raise JobError("prompts are text: set workload.tokenizer (HF tokenizer path or hub id) to count tokens")
            ids = load_tokenizer(tokenizer)(prompts.to_pylist())["input_ids"]
            lengths = [len(i) for i in ids]
        else:
            lengths = pc.list_value_length(prompts).to_pylist()
        if not lengths:
            raise JobError(f"workload.path {url} has no prompts")
        return cls(sum(lengths) / len(lengths), output_tokens, len(lengths))


@dataclass
class PlanSettings:
    max_devices: int = 8  # per option: the colocated pool, or prefill + decode pools
    max_batch: int = 256  # sequences per decode step (the engine's max_num_seqs)
    memory_utilization: float = 0.9  # of device memory, for weights and KV
    network_gbps: float = 100.0  # per device, between the pools, where the catalogue gives none
    # Fix a pool's size instead of searching (e.g. to compare with a bench run).
    colocated_size: Optional[int] = None
    prefill_size: Optional[int] = None
    decode_size: Optional[int] = None


@dataclass(frozen=True)
class Option:
    """One way to run the workload: (hardware, devices) per pool, colocated has one pool."""

    mode: str
    pools: tuple[tuple[Hardware, int], ...]
    batch: int  # decode sequences per device
    requests_per_s: float
    output_tokens_per_s: float
    kv_gb_per_s: float
    bound: str  # what limits throughput: prefill, decode or network

    @property
    def usd_per_hour(self) -> float:
        return sum(hw.usd_per_hour * n for hw, n in self.pools)

    @property
    def usd_per_m_tokens(self) -> float:
        return self.usd_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    def hydra_overrides(self) -> list[str]:
        """The same configuration for `jobs.generate`."""
        names = ("colocated",) if self.mode == "colocated" else ("prefill", "decode")
        overrides = [f"mode={self.mode}", f"engine.device={self.pools[-1][0].device}"]
        for name, (hw, n) in zip(names, self.pools):
            overrides.append(f"pools.{name}.size={n}")
            if hw.device == "cuda":
                overrides.append(f"pools.{name}.num_gpus=1")
        # Batches of half the engine's sequences: with the engine pools' 3 in hand, it stays full
        # while one is replaced.
        pool = f"pools.{names[-1]}"
        return overrides + [f"{pool}.max_num_seqs={self.batch}", f"{pool}.batch_size={-(-self.batch // 2)}"]


def cheapest(options: Iterable[Option]) -> Option:
    """Lowest $ per output token; of equally cheap options, the fastest."""
    options = list(options)
    low = min(o.usd_per_m_tokens for o in options) * (1 + 1e-9)  # float noise
    return max((o for o in options if o.usd_per_m_tokens <= low), key=lambda o: o.output_tokens_per_s)


class Planner:
    def __init__(self, model: ModelSpec, workload: Workload, efficiency: Efficiency, settings: PlanSettings):
        self.model, self.workload, self.eff, self.settings = model, workload, efficiency, settings

    @property
    def kv_bytes_per_request(self) -> float:
        """What crosses the network: the prompt's KV."""
        return self.workload.prompt_tokens * self.model.kv_bytes_per_token

    @property
    def kv_bytes_per_sequence(self) -> float:
        """A decoding sequence's KV at its mean context."""
        return (self.workload.prompt_tokens + self.workload.output_tokens / 2) * self.model.kv_bytes_per_token

    def prefill_rate(self, hw: Hardware) -> float:
        """Prompt tokens/s per device."""
        return self.eff.prefill * hw.tflops * 1e12 / (2 * self.model.params)

    def decode_batch(self, hw: Hardware) -> int:
        """Sequences whose KV fits beside the weights, at their mean context; < 1: the model
        does not fit."""
        room = self.settings.memory_utilization * hw.mem_gib * 2**30 - self.model.weight_bytes
        return min(self.settings.max_batch, math.floor(room / self.kv_bytes_per_sequence))

    def decode_rate(self, hw: Hardware) -> float:
        """Output tokens/s per device at a full batch."""
        batch = self.decode_batch(hw)
        step_bytes = self.model.weight_bytes + batch * self.kv_bytes_per_sequence
        return batch / (step_bytes / (self.eff.decode * hw.mem_bw_gbs * GB))

    def colocated(self, hw: Hardware, n: int) -> Option:
        """Each device time-shares: per request it spends prompt / prefill rate seconds on
        prefill and output / decode rate seconds on its share of decode steps. (Chunked
        prefill can hide some prefill inside memory-bound decode steps; not counted.)"""
        prefill_s = self.workload.prompt_tokens / self.prefill_rate(hw)
        decode_s = self.workload.output_tokens / self.decode_rate(hw)
        requests = n / (prefill_s + decode_s)
        bound = "prefill" if prefill_s > decode_s else "decode"
        return Option(
            "colocated", ((hw, n),), self.decode_batch(hw), requests, requests * self.workload.output_tokens, 0.0, bound
        )

    def disaggregated(self, prefill: Hardware, p: int, decode: Hardware, d: int) -> Option:
        """Requests/s = the least of what p prefill devices, d decode devices and the network
        between the pools (each device's NIC, on both sides) can carry."""
        nic = lambda hw: (hw.nic_gbps or self.settings.network_gbps) * GB / 8  # noqa: E731 (bytes/s)
        limits = {
            "prefill": p * self.prefill_rate(prefill) / self.workload.prompt_tokens,
            "decode": d * self.decode_rate(decode) / self.workload.output_tokens,
            "network": self.eff.network * min(p * nic(prefill), d * nic(decode)) / self.kv_bytes_per_request,
        }
        bound = min(limits, key=limits.get)
        requests = limits[bound]
        kv_gb_per_s = requests * self.kv_bytes_per_request / GB
        return Option(
            "disaggregated",
            ((prefill, p), (decode, d)),
            self.decode_batch(decode),
            requests,
            requests * self.workload.output_tokens,
            kv_gb_per_s,
            bound,
        )

    def best_split(self, prefill: Hardware, decode: Hardware) -> Option:
        """The cheapest P:D split within max_devices (or the fixed sizes)."""
        s = self.settings
        prefill_sizes = [s.prefill_size] if s.prefill_size else range(1, s.max_devices)
        return cheapest(
            self.disaggregated(prefill, p, decode, d)
            for p in prefill_sizes
            for d in ([s.decode_size] if s.decode_size else range(1, max(s.max_devices - p, 1) + 1))
        )

    def options(self, catalogue: list[Hardware]) -> list[Option]:
        """Colocated on each device type and the best split on each (prefill, decode) pair,
        cheapest first; device types the model does not fit are left out."""
        fitting = [hw for hw in catalogue if self.decode_batch(hw) >= 1]
        if not fitting:
            raise JobError(f"{self.model.name} does not fit on any of: {', '.join(hw.name for hw in catalogue)}")
        size = self.settings.colocated_size or self.settings.max_devices
        options = [self.colocated(hw, size) for hw in fitting]
        options += [self.best_split(p, d) for p in fitting for d in fitting]
        return sorted(options, key=lambda o: o.usd_per_m_tokens)


def catalogue(entries: dict[str, Hardware]) -> list[Hardware]:
    return [replace(hw, name=name) for name, hw in entries.items()]


def load_bench(path: str) -> dict:
    try:
        bench = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise JobError(f"bench result {path} does not exist") from None
    if not {"colocated", "disaggregated"} <= set(bench):
        raise JobError(f"{path} is not a jobs.bench result (no colocated and disaggregated runs)")
    failed = [f"{mode}: {bench[mode]['error']}" for mode in ("colocated", "disaggregated") if "error" in bench[mode]]
    if failed:
        raise JobError(f"{path}: not every run ran ({'; '.join(failed)})")
    return bench
