"""One engine's whole cache as the KV connector sees it: the layers whose cache grows per token
(attention, MLA) and the recurrent layers' state, each in the KV cache group whose block ids
address it.

A request's block ids come per group (vLLM's hybrid KV cache manager; one group without it).
Token layers are gathered group by group, in the groups' order and each group's layer order,
into one canonical tensor [layers, parts, tokens, heads, head_dim]; the engines at both ends
build the same groups from the same model, so the order agrees. The recurrent layers' state
follows as raw bytes (pipeline/kv/state.py).
"""

from typing import TYPE_CHECKING

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec, UniformTypeKVCacheSpecs

from pipeline.kv.layout import PagedCache
from pipeline.kv.state import StateCache

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec

BlockIds = tuple[list[int], ...]  # per KV cache group


class EngineCache:
    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        kv_cache_config: "KVCacheConfig",
        vllm_config: "VllmConfig",
        state_bytes_per_layer: int,
    ):
        attention = vllm_config.compilation_config.static_forward_context
        dtype = vllm_config.model_config.dtype
        self.token_groups: list[tuple[int, PagedCache]] = []
        state_caches, state_groups = [], []
        for g, group in enumerate(kv_cache_config.kv_cache_groups):
            names = sorted((n for n in group.layer_names if n in kv_caches), key=extract_layer_index)
            if not names:
                continue
            spec = _layer_spec(group.kv_cache_spec, names[0])
            if isinstance(spec, MambaSpec):
                if spec.mamba_cache_mode != "none":
                    raise NotImplementedError(
                        f"KV transfer moves recurrent state with mamba_cache_mode 'none' (prefix caching off), "
                        f"not '{spec.mamba_cache_mode}'"
                    )
                state_caches += [kv_caches[n] for n in names]
                state_groups += [g] * len(names)
            elif isinstance(spec, AttentionSpec):
                layer = attention[names[0]]
                cache = PagedCache(
                    [kv_caches[n] for n in names],
                    layer.attn_backend.get_name(),
                    block_size=spec.block_size,
                    head_dim=spec.head_size,
                    dtype=dtype,
                    isa=getattr(layer, "isa", None),
                )
                self.token_groups.append((g, cache))
            else:
                raise NotImplementedError(f"KV transfer cannot move a {type(spec).__name__} cache")
        self.state = StateCache(state_caches, state_groups, state_bytes_per_layer)
        self.layers = [len(cache.layers) for _, cache in self.token_groups]
        self.device = next(iter(kv_caches.values())).device
        self.dtype = dtype

    def gather(self, block_ids: BlockIds, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) of a request in canonical layout, on the cache's device (none of
        a model of recurrent layers alone)."""
        parts = [cache.gather(block_ids[g], start, stop) for g, cache in self.token_groups]
        if not parts:
            return torch.empty(0, 2, stop - start, 0, 0, dtype=self.dtype, device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def scatter(self, block_ids: BlockIds, kv: torch.Tensor, start: int, stop: int, offset: int) -> None:
        """Canonical tokens [start, stop) into a request's blocks, from `kv` holding tokens from
        `offset` on (PagedCache.scatter)."""
        for (g, cache), layers in zip(self.token_groups, kv.split(self.layers)):
            cache.scatter(block_ids[g], layers, start, stop, offset)


def _layer_spec(spec: "KVCacheSpec", name: str) -> "KVCacheSpec":
    """A layer's own spec: a group of layers of one type may hold several specs."""
    return spec.kv_cache_specs[name] if isinstance(spec, UniformTypeKVCacheSpecs) else spec
