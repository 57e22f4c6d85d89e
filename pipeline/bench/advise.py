"""jobs.advise: the parallel run before migrating, as one command. A seeded sample of the user's
input runs colocated and disaggregated side by side on the machine at hand (the bench, plain
vLLM too where it applies); the two outputs are compared row by row; the disaggregated run
calibrates the planner for this machine; the planner, on the whole input's workload, prices
every hardware option. What the advice says, and why, is pipeline/bench/advice.py.

Files in output.path: `_sample.parquet` (the sample, every column), `bench/` (the bench's
runs of it), `_advice.md` and `_advice.json`."""

import copy
import json
import os
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench.advice import Identity, MachineRun
from pipeline.bench.advice_report import Advice, advice
from pipeline.bench.config import AdviseConfig, BenchConfig, BenchMode
from pipeline.bench.throughput import bench
from pipeline.columns import ERROR, GENERATED_TOKENS, ID
from pipeline.config import ENGINE_POOLS, Device, InputFormat
from pipeline.engine.model import ResolvedModel, dtype_bytes, resolve_model
from pipeline.errors import JobError
from pipeline.io.source import PromptSource
from pipeline.io.storage import read_output
from pipeline.job.metrics import JobMetrics
from pipeline.job.run import served_models
from pipeline.plan.roofline import Efficiency, Hardware, ModelSpec, Planner, Workload, catalogue, load_bench

SAMPLE, ADVICE_MD, ADVICE_JSON, BENCH_DIR = "_sample.parquet", "_advice.md", "_advice.json", "bench"


def advise(cfg: AdviseConfig, overrides: list[str]) -> Advice:
    """Runs the sample, writes _advice.md and _advice.json into output.path and returns the
    advice. `overrides`: the command line's, whose job keys the recommended command repeats."""
    root = Path(cfg.output.path)
    # The input as the job reads it: its files, checks and row numbers.
    source = PromptSource(cfg.input, cfg.output.shard_rows, (cfg.input.source_column,), served=served_models(cfg))
    cfg = replace(cfg, input=source.cfg)  # OpenAI Batch files: the columns their rows have
    total = source.num_rows
    machine = machine_entry(cfg)
    here, gpu = model_specs(cfg)
    devices = catalogue(cfg.hardware)
    if devices:  # a model that fits on none of them is refused before any work
        Planner(gpu, Workload(1, 1, 1), cfg.efficiency, cfg.plan).options(devices)
    run = measure(cfg, root=root, source=source, machine=machine, spec=here)
    said = advice(
        cfg,
        run=run,
        gpu=gpu,
        devices=devices,
        identity=compare_outputs(root / BENCH_DIR),
        total_rows=total,
        task=overrides,
        sample=str(root / SAMPLE),
    )
    (root / ADVICE_MD).write_text("\n".join(said.lines) + "\n")
    (root / ADVICE_JSON).write_text(json.dumps(said.figures, indent=2))
    return said


def measure(cfg: AdviseConfig, *, root: Path, source: PromptSource, machine: Hardware, spec: ModelSpec) -> MachineRun:
    """The sample (root/_sample.parquet) through the bench on this machine (root/bench), and
    the efficiencies its disaggregated run measures for this machine's catalogue entry."""
    root.mkdir(parents=True, exist_ok=True)
    rows = sample_indices(source.num_rows, cfg.advise.sample_rows, cfg.advise.seed)
    pq.write_table(take_rows(source, rows), root / SAMPLE)
    plain_skipped = plain_does_not_apply(cfg, source.schema.names)
    bench_json = str(bench(bench_config(cfg, root, plain_skipped is None), root / BENCH_DIR))
    results = load_bench(bench_json)
    cores = machine_cores(results)
    # The bench's engines batch max_num_seqs sequences, on one core each in its split.
    settings = replace(cfg.plan, max_batch=cfg.pools.decode.max_num_seqs, max_devices=cores)
    return MachineRun(
        hardware=machine,
        results=results,
        cores=cores,
        spec=spec,
        efficiency=Efficiency.from_bench(bench_json, machine, spec, settings, cfg.efficiency.network),
        settings=settings,
        plain_skipped=plain_skipped,
    )


def machine_entry(cfg: AdviseConfig) -> Hardware:
    """The catalogue entry of the machine the sample runs on, for the device the job runs on."""
    entries = catalogue(cfg.machine)
    if len(entries) != 1:
        raise JobError(f"name one catalogue entry for the machine at hand (hardware@machine=...), not {len(entries)}")
    if entries[0].device != cfg.engine.device.value:
        raise JobError(
            f"the machine at hand is {entries[0].name} ({entries[0].device}) but "
            f"engine.device={cfg.engine.device.value}: "
            "name this machine's entry with hardware@machine=<conf/hardware entry>"
        )
    return entries[0]


def model_specs(cfg: AdviseConfig) -> tuple[ModelSpec, ModelSpec]:
    """The user's model for the planner: as it runs here (the sample's dtype), and as it runs on
    CUDA (model.dtype, or the checkpoint's own 16-bit type), from its config and checkpoint."""
    here = resolve_model(cfg.model, cfg.engine)
    gpu = resolve_model(cfg.model, replace(cfg.engine, device=Device.cuda))
    return model_spec(cfg.model.name, here), model_spec(cfg.model.name, gpu)


def model_spec(name: str, model: ResolvedModel) -> ModelSpec:
    if model.weights is None:
        raise JobError(
            f"model {name} ({model.path}): no safetensors files to count its parameters from; jobs.advise needs "
            "the checkpoint in a local folder (model.checkpoint=DIR, or the hub id downloaded first)"
        )
    cache, weights = model.cache, model.weights
    return ModelSpec(
        name=name,
        params=weights.params,
        # Prefill multiplies each prompt token by the body (the head once per sequence, the
        # embedding never), as pipeline/engine/work.py counts an engine's FLOPs.
        active_params=weights.body_params,
        dtype_bytes=dtype_bytes(model.dtype),
        kv_dtype_bytes=cache.dtype_bytes,
        family=cache.family,
        layers=cache.layers,
        kv_heads=cache.kv_heads,
        head_dim=cache.head_dim,
        window=cache.window,
        state_layers=cache.state_layers,
        state_bytes_per_layer=cache.state_bytes_per_layer,
        recurrent=cache.recurrent,
    )


def sample_indices(total: int, rows: int, seed: int) -> np.ndarray:
    """`rows` row numbers of `total` (all of them when it has no more), sorted: one drawn with
    `seed` from each of `rows` equal stretches of the input, so that the sample spans all of it
    (an input sorted by length or source keeps its mix) and is the same on every run."""
    if rows >= total:
        return np.arange(total)
    edges = np.arange(rows + 1, dtype=np.int64) * total // rows
    offsets = np.random.default_rng(seed).random(rows) * np.diff(edges)
    return edges[:-1] + offsets.astype(np.int64)


def take_rows(source: PromptSource, indices: np.ndarray) -> pa.Table:
    """The rows at `indices` (sorted, job-wide row numbers), every column, reading only the row
    groups that hold them."""
    if source.requests:  # OpenAI Batch files, as rows
        return pa.concat_tables(source.request_tables()).take(indices)
    pieces, start = [], 0
    for file in source.files:
        parquet = None
        for group, rows in enumerate(file.row_groups):
            first, stop = np.searchsorted(indices, [start, start + rows])
            if stop > first:
                parquet = parquet or pq.ParquetFile(file.path, filesystem=source.arrow_fs)
                pieces.append(parquet.read_row_group(group).take(indices[first:stop] - start))
            start += rows
    return pa.concat_tables(pieces)


def plain_does_not_apply(cfg: AdviseConfig, columns: list[str]) -> str | None:
    """Why plain vLLM's baseline cannot run this job as the pipeline does (None: it can): it
    generates one completion per prompt text with the job's sampling."""
    if BenchMode.plain not in cfg.bench.modes:
        return "left out (bench.modes)"
    if cfg.input.messages_column:
        return "the input holds conversations (input.messages_column); the baseline reads prompts"
    if cfg.input.sampling_column in columns:
        return f"rows carry their own sampling ({cfg.input.sampling_column}), which the baseline does not apply"
    if cfg.sampling.n > 1:
        return f"sampling.n={cfg.sampling.n}: the baseline counts one completion per prompt"
    if cfg.sampling.lora is not None:
        return f"sampling.lora={cfg.sampling.lora}: the baseline runs the base model"
    return None


def bench_config(cfg: AdviseConfig, root: Path, plain: bool) -> BenchConfig:
    """The bench of the sample: the user's job as given, into root/bench, one round of the modes
    (plain vLLM where it applies, then colocated and disaggregated)."""
    job = BenchConfig(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(BenchConfig)})
    job.input.path, job.output.path = str(root / SAMPLE), str(root / BENCH_DIR)
    job.input.format = InputFormat.parquet  # the sample: the input's rows, as the job reads them
    wanted = [BenchMode.plain] if plain else []
    job.bench = replace(job.bench, modes=wanted + [BenchMode.colocated, BenchMode.disaggregated])
    (root / BENCH_DIR).mkdir(exist_ok=True)
    return job


def machine_cores(results: dict) -> int:
    """The cores the pipeline's engines ran on (on CPU, each a device of the catalogue entry)."""
    cores = {
        core
        for mode in ("colocated", "disaggregated")
        for name, stage in JobMetrics.from_dict(results[mode]).stages.items()
        if name in ENGINE_POOLS
        for core in stage.cores
    }
    return len(cores) or len(os.sched_getaffinity(0))


def compare_outputs(root: Path) -> Identity:
    """The disaggregated run's tokens (and row errors) against the colocated run's, by row id."""
    outputs = [read_output(str(root / mode), [ID, GENERATED_TOKENS, ERROR]) for mode in ("colocated", "disaggregated")]
    colocated, split = ({row[ID]: row for row in table.to_pylist()} for table in outputs)
    differing = sorted(str(i) for i in colocated.keys() | split.keys() if colocated.get(i) != split.get(i))
    return Identity(rows=len(colocated.keys() | split.keys()), differing=differing)
