"""Capacity planner: a roofline model of prefill, decode and the KV transfer between them, which
predicts throughput and cost of colocated and disaggregated runs on each hardware mix and picks
the cheapest per output token.

An engine spans `tp` devices of one kind (tensor parallel): a power of two whose memory holds the
weights and at least one sequence, the fewest or more where more sequences pay. Pools are whole
engines; per device, with efficiency factors scaling the datasheet peaks (see `Efficiency`):

- prefill is compute-bound: prompt tokens/s = eff.prefill · FLOP/s / (2 · active params). The
  attention FLOPs (~4 · layers · hidden · context per token) are left out: a few % at 2k tokens
  for 8B. Tensor parallelism is taken to scale perfectly (its all-reduces are left out).
- decode is bandwidth-bound: each step reads all the weights once (a batch of sequences touches
  every expert of an MoE) and the cache of every sequence in the batch, at its mean context
  (prompt + output / 2). The batch is what fits in the engine's memory next to the weights,
  capped at `PlanSettings.max_batch`. Engine output tokens/s = batch / step, step = (weight
  bytes + batch · cache bytes per sequence) / (tp · eff.decode · memory bandwidth). Its compute
  term is left out (far below the memory term at these batch sizes on GPUs).
- a prompt's cache (`CacheGeometry.request_bytes`: KV, and a hybrid's recurrent state) crosses
  the network once, at eff.network · NIC bandwidth, on each side of the link. In a split, the
  prefill engines spend eff.handoff of their busy time on the handoff, not prefilling.
- power: a device draws its idle watts plus the share of the step from idle to busy (`Hardware`)
  that the option keeps it busy: all of it colocated and on a split's bottleneck, the rest of
  the split in proportion to the requests it carries of those it could.

Cache bytes come from pipeline/engine/family.py, as the KV handoff counts them.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

from omegaconf import MISSING

from pipeline.engine.family import CacheGeometry, Family
from pipeline.engine.model import load_tokenizer
from pipeline.errors import JobError
from pipeline.job.metrics import JobMetrics, StageMetrics

GB = 1e9


@dataclass
class ModelSpec:
    """A catalogue entry (conf/model_spec/): the weights, and the cache as family.py describes it."""

    name: str = MISSING
    params: float = MISSING  # all of them: what decode reads and memory holds
    active_params: Optional[float] = None  # an MoE's per token, what prefill computes with; None: params
    dtype_bytes: int = 2  # of the weights as served
    kv_dtype_bytes: Optional[int] = None  # of the cache; None: dtype_bytes (fp8 weights keep a bf16 cache)
    family: Family = Family.attention
    layers: int = MISSING  # those whose cache grows with the tokens (a hybrid's attention layers)
    kv_heads: int = MISSING  # mla: 1
    head_dim: int = MISSING  # mla: kv_lora_rank + qk_rope_head_dim
    window: Optional[int] = None  # sliding: the tokens a request keeps
    state_layers: int = 0  # hybrid: recurrent layers (Mamba-2, Gated DeltaNet)
    state_bytes_per_layer: int = 0
    recurrent: Optional[str] = None  # hybrid: the recurrent layers' kind (mamba2, gated_delta_net)

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def flop_params(self) -> float:
        """The parameters each token is multiplied with."""
        return self.active_params or self.params

    @property
    def cache(self) -> CacheGeometry:
        return CacheGeometry(
            self.family,
            layers=self.layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype_bytes=self.kv_dtype_bytes or self.dtype_bytes,
            window=self.window,
            state_layers=self.state_layers,
            state_bytes_per_layer=self.state_bytes_per_layer,
            recurrent=self.recurrent,
        )


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
    # Board power: at rest holding an engine, and at full load (its TDP: decode draws less).
    idle_watts: float = MISSING
    busy_watts: float = MISSING
    # Network between this device and the other pool; None: PlanSettings.network_gbps.
    nic_gbps: Optional[float] = None


@dataclass
class Efficiency:
    """Fractions of peak reached: FLOP/s in prefill, memory bandwidth in decode, network in
    the KV transfer; and `handoff`, the share of a split's prefill busy time spent handing the KV
    off (a bench's kv_handoff_share_of_prefill), which a colocated engine does not spend. The
    defaults are typical of vLLM on GPUs; `from_bench` measures them."""

    prefill: float = 0.5
    decode: float = 0.6
    network: float = 0.7
    handoff: float = 0.0

    @classmethod
    def from_bench(
        cls, path: str, hardware: Hardware, model: ModelSpec, settings: "PlanSettings", network: float = 0.7
    ) -> "Efficiency":
        """The factors with which this model reproduces the prefill and decode stage rates of a
        `jobs.bench` result measured on `hardware` (its disaggregated run, which times each
        phase on its own pool, in engines of one device: a split runs no other). A stage's busy
        seconds are summed over its workers; on CPU each core a worker was bound to is a device,
        on GPUs each worker is one. The network factor is kept: the bench moves KV in memory.
        Prefill's factor is measured on its busy time less the handoff's share, so that a split
        reproduces the bench and colocated prefill gets the time back.

        NOTE: the bench's handoff seconds are both pools' (prefill's and decode's copies) over the
        prefill pool's busy seconds; the planner charges them all to prefill."""
        run = JobMetrics.from_dict(load_bench(path)["disaggregated"])
        handoff = run.kv_handoff_share_of_prefill or 0.0

        def device_seconds(stage: StageMetrics) -> float:
            return stage.busy_seconds * (stage.cores_per_worker if hardware.device == "cpu" else 1)

        peak = Planner(model, Workload.from_metrics(run), cls(1.0, 1.0, network), settings)
        prefill_seconds = device_seconds(run.stages["prefill"]) * (1 - handoff)
        prefill = run.input_tokens / prefill_seconds / peak.prefill_rate(hardware)
        decode = run.output_tokens / device_seconds(run.stages["decode"]) / peak.decode_rate(hardware)
        return cls(prefill=prefill, decode=decode, network=network, handoff=handoff)


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
    max_batch: int = 256  # sequences per engine's decode step (its max_num_seqs)
    memory_utilization: float = 0.9  # of device memory, for weights and KV
    network_gbps: float = 100.0  # per device, between the pools, where the catalogue gives none
    # Fix a pool's devices instead of searching (e.g. to compare with a bench run), rounded down
    # to whole engines.
    colocated_size: Optional[int] = None
    prefill_size: Optional[int] = None
    decode_size: Optional[int] = None


# The largest engine looked for when saying what a model that fits nowhere would need.
LARGEST_ENGINE = 1024


@dataclass(frozen=True)
class Pool:
    """`devices` of one kind, in engines of `tp` each (tensor parallel)."""

    hardware: Hardware
    devices: int
    tp: int = 1

    @property
    def engines(self) -> int:
        return self.devices // self.tp

    def watts(self, load: float) -> float:
        """The pool's draw when busy for `load` of its time: its devices idle the rest of it."""
        hw = self.hardware
        return self.devices * (hw.idle_watts + (hw.busy_watts - hw.idle_watts) * load)


@dataclass(frozen=True)
class Forecast:
    """A whole job on one option: its wall time, cost and the devices' energy."""

    hours: float
    usd: float
    kwh: float


@dataclass(frozen=True)
class Option:
    """One way to run the workload: colocated has one pool, disaggregated prefill and decode."""

    mode: str
    pools: tuple[Pool, ...]
    batch: int  # decode sequences per engine
    requests_per_s: float
    output_tokens_per_s: float
    kv_gb_per_s: float
    bound: str  # what limits throughput: prefill, decode or network
    watts: float  # the pools' devices together, at this throughput

    @property
    def runnable(self) -> bool:
        """Whether kvrelay runs it today: the KV handoff reads and writes the cache in the engine's
        own process, so a split needs engines of one device on both sides."""
        return self.mode == "colocated" or all(pool.tp == 1 for pool in self.pools)

    @property
    def usd_per_hour(self) -> float:
        return sum(pool.hardware.usd_per_hour * pool.devices for pool in self.pools)

    @property
    def usd_per_m_tokens(self) -> float:
        return self.usd_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    @property
    def joules_per_token(self) -> float:
        """Per output token; the devices' energy only (no host, network or cooling)."""
        return self.watts / self.output_tokens_per_s

    @property
    def kwh_per_m_tokens(self) -> float:
        return self.joules_per_token * 1e6 / 3.6e6

    def forecast(self, output_tokens: float) -> Forecast:
        """A job that generates `output_tokens` in all, at this option's steady throughput."""
        hours = output_tokens / self.output_tokens_per_s / 3600
        return Forecast(hours=hours, usd=hours * self.usd_per_hour, kwh=hours * self.watts / 1000)

    def hydra_overrides(self) -> list[str]:
        """The same configuration for `jobs.generate`: a worker per engine, holding its GPUs."""
        assert self.runnable, "kvrelay does not split tensor-parallel engines"
        names = ("colocated",) if self.mode == "colocated" else ("prefill", "decode")
        overrides = [f"mode={self.mode}", f"engine.device={self.pools[-1].hardware.device}"]
        tp = self.pools[-1].tp  # the one pool's, or 1 on both sides of a split
        if tp > 1:
            overrides.append(f"engine.tensor_parallel_size={tp}")
        for name, pool in zip(names, self.pools):
            overrides.append(f"pools.{name}.size={pool.engines}")
            if pool.hardware.device == "cuda":
                overrides.append(f"pools.{name}.num_gpus={pool.tp}")
        # Batches of half the engine's sequences: with the engine pools' 3 in hand, it stays full
        # while one is replaced.
        pool = f"pools.{names[-1]}"
        return overrides + [f"{pool}.max_num_seqs={self.batch}", f"{pool}.batch_size={-(-self.batch // 2)}"]


def cheapest(options: Iterable[Option]) -> Option:
    """Lowest $ per output token; of equally cheap options, the fastest."""
    options = list(options)
    low = min(o.usd_per_m_tokens for o in options) * (1 + 1e-9)  # float noise
    return max((o for o in options if o.usd_per_m_tokens <= low), key=lambda o: o.output_tokens_per_s)


def best(options: Iterable[Option]) -> list[Option]:
    """The cheapest of `options` and, where kvrelay does not run that one, the cheapest it runs;
    none of none."""
    options = list(options)
    if not options:
        return []
    low = cheapest(options)
    runnable = [o for o in options if o.runnable]
    return [low] if low.runnable or not runnable else [cheapest(runnable), low]


class Planner:
    def __init__(self, model: ModelSpec, workload: Workload, efficiency: Efficiency, settings: PlanSettings):
        self.model, self.workload, self.eff, self.settings = model, workload, efficiency, settings

    @property
    def kv_bytes_per_request(self) -> float:
        """What crosses the network: the prompt's cache."""
        return self.model.cache.request_bytes(self.workload.prompt_tokens)

    def kv_bytes_per_sequence(self, tp: int = 1) -> float:
        """A decoding sequence's cache at its mean context, in an engine of `tp` devices. vLLM
        splits the KV heads among them; with fewer heads than devices (an MLA latent has one)
        each device keeps a copy. A hybrid's recurrent state splits by its own heads: no copies."""
        cache = self.model.cache
        request = cache.request_bytes(self.workload.prompt_tokens + self.workload.output_tokens / 2)
        copies = tp * math.ceil(cache.kv_heads / tp) / cache.kv_heads
        return request + (copies - 1) * (request - cache.state_bytes)

    def prefill_rate(self, hw: Hardware) -> float:
        """Prompt tokens/s per device."""
        return self.eff.prefill * hw.tflops * 1e12 / (2 * self.model.flop_params)

    def decode_batch(self, hw: Hardware, tp: int = 1) -> int:
        """Sequences whose cache fits beside the weights in an engine of `tp` devices, at their mean
        context; < 1: the model does not fit."""
        room = self.settings.memory_utilization * hw.mem_gib * 2**30 * tp - self.model.weight_bytes
        return min(self.settings.max_batch, math.floor(room / self.kv_bytes_per_sequence(tp)))

    def decode_rate(self, hw: Hardware, tp: int = 1) -> float:
        """Output tokens/s per device, in engines of `tp` at a full batch: a step reads the weights
        and the batch's caches from the engine's devices at once."""
        batch = self.decode_batch(hw, tp)
        step_bytes = self.model.weight_bytes + batch * self.kv_bytes_per_sequence(tp)
        step = step_bytes / (tp * self.eff.decode * hw.mem_bw_gbs * GB)
        return batch / step / tp

    def engine_sizes(self, hw: Hardware, most: int) -> list[int]:
        """Devices per engine of `hw` up to `most` that hold the weights and a sequence: powers of
        two, as vLLM splits heads evenly. More than the fewest hold more sequences, or fewer where
        each device keeps a copy of every sequence's cache (MLA)."""
        return [tp for tp in (2**i for i in range(most.bit_length())) if self.decode_batch(hw, tp) >= 1]

    def pools(self, hw: Hardware, tps: list[int], fixed: Optional[int], most: int) -> list[Pool]:
        """Pools of whole engines of each of `tps`: `fixed` devices rounded down to them, or each
        size up to `most` devices."""
        sizes = lambda tp: [fixed - fixed % tp] if fixed else range(tp, most + 1, tp)  # noqa: E731
        return [Pool(hw, n, tp) for tp in tps for n in sizes(tp) if n]

    def colocated(self, pool: Pool) -> Option:
        """Each engine time-shares: per request it spends prompt / prefill rate seconds on
        prefill and output / decode rate seconds on its share of decode steps. (Chunked
        prefill can hide some prefill inside memory-bound decode steps; not counted.)"""
        hw, tp = pool.hardware, pool.tp
        prefill_s = self.workload.prompt_tokens / self.prefill_rate(hw)
        decode_s = self.workload.output_tokens / self.decode_rate(hw, tp)
        requests = pool.devices / (prefill_s + decode_s)
        return Option(
            mode="colocated",
            pools=(pool,),
            batch=self.decode_batch(hw, tp),
            requests_per_s=requests,
            output_tokens_per_s=requests * self.workload.output_tokens,
            kv_gb_per_s=0.0,
            bound="prefill" if prefill_s > decode_s else "decode",
            watts=pool.watts(1.0),
        )

    def disaggregated(self, prefill: Pool, decode: Pool) -> Option:
        """Requests/s = the least of what the prefill devices (less their handoff time), the decode
        devices and the network between the pools (each device's NIC, on both sides) can carry.
        Each pool is busy for the share of its own limit that this carries."""
        nic = lambda pool: pool.devices * (pool.hardware.nic_gbps or self.settings.network_gbps) * GB / 8  # noqa: E731 (bytes/s)
        prefill_rate = self.prefill_rate(prefill.hardware) * (1 - self.eff.handoff)
        limits = {
            "prefill": prefill.devices * prefill_rate / self.workload.prompt_tokens,
            "decode": decode.devices * self.decode_rate(decode.hardware, decode.tp) / self.workload.output_tokens,
            "network": self.eff.network * min(nic(prefill), nic(decode)) / self.kv_bytes_per_request,
        }
        bound = min(limits, key=limits.get)
        requests = limits[bound]
        return Option(
            mode="disaggregated",
            pools=(prefill, decode),
            batch=self.decode_batch(decode.hardware, decode.tp),
            requests_per_s=requests,
            output_tokens_per_s=requests * self.workload.output_tokens,
            kv_gb_per_s=requests * self.kv_bytes_per_request / GB,
            bound=bound,
            watts=prefill.watts(requests / limits["prefill"]) + decode.watts(requests / limits["decode"]),
        )

    def best_colocated(self, hw: Hardware) -> list[Option]:
        """The cheapest engine size on max_devices (or the fixed size) of `hw`."""
        s = self.settings
        tps = self.engine_sizes(hw, s.max_devices)
        return best(self.colocated(pool) for pool in self.pools(hw, tps, s.colocated_size or s.max_devices, 0))

    def best_split(self, prefill: Hardware, decode: Hardware) -> list[Option]:
        """The cheapest P:D split within max_devices (or the fixed sizes). Prefill engines are the
        fewest devices that hold the model: more would prefill no faster per device."""
        s = self.settings
        prefill_tp = self.engine_sizes(prefill, s.max_devices)[:1]
        decode_tps = self.engine_sizes(decode, s.max_devices)
        return best(
            self.disaggregated(p, d)
            for p in self.pools(prefill, prefill_tp, s.prefill_size, s.max_devices - 1)
            for d in self.pools(decode, decode_tps, s.decode_size, max(s.max_devices - p.devices, 1))
        )

    def options(self, catalogue: list[Hardware]) -> list[Option]:
        """Colocated on each device type and the best split on each (prefill, decode) pair,
        cheapest first; what does not fit within max_devices is left out."""
        fitting = [hw for hw in catalogue if self.engine_sizes(hw, self.settings.max_devices)]
        if not fitting:
            raise JobError(
                f"{self.model.name} does not fit on any of the selected hardware within plan.max_devices="
                f"{self.settings.max_devices}; an engine needs {', '.join(self.engine_needs(hw) for hw in catalogue)}"
            )
        options = [o for hw in fitting for o in self.best_colocated(hw)]
        options += [o for p in fitting for d in fitting for o in self.best_split(p, d)]
        return sorted(options, key=lambda o: o.usd_per_m_tokens)

    def engine_needs(self, hw: Hardware) -> str:
        """The fewest devices an engine of `hw` needs, in words."""
        tp = self.engine_sizes(hw, LARGEST_ENGINE)[:1]
        return f"{tp[0]} x {hw.name}" if tp else f"more than {LARGEST_ENGINE} x {hw.name}"


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
