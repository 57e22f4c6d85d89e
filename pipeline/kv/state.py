"""Recurrent layers' state (Mamba conv and SSM state, Gated DeltaNet's) <-> the bytes a payload
carries.

vLLM gives a connector each recurrent layer's cache as raw bytes, [blocks, 1, 1, state bytes],
over pages that may be padded to the attention layers' page size (the view's block stride says
how far apart they lie). With prefix caching off (mamba_cache_mode "none") a request holds one
block per recurrent group, the first of its block ids, and it holds the state as of the tokens
computed so far. A payload carries every layer's state one after another, in layer order: the
bytes are the engine's own (conv state, then SSM state), so both ends must lay them out alike,
which the same model, dtype and platform do.
"""

import torch


class StateCache:
    """Every recurrent layer's state blocks of one engine, by the KV cache group each is in."""

    def __init__(self, caches: list[torch.Tensor], groups: list[int], state_bytes_per_layer: int):
        for cache in caches:
            if cache.dtype not in (torch.int8, torch.uint8) or cache[0].numel() != state_bytes_per_layer:
                raise NotImplementedError(
                    f"recurrent state view {tuple(cache.shape)} {cache.dtype} is not {state_bytes_per_layer} bytes "
                    "per request, as the model's config makes it: KV transfer cannot move it"
                )
        self.caches = [cache.view(torch.uint8).flatten(1) for cache in caches]
        self.groups = groups
        self.nbytes = len(caches) * state_bytes_per_layer

    def read(self, block_ids: tuple[list[int], ...]) -> torch.Tensor:
        """A request's state, every layer's bytes in one tensor on the cache's device."""
        if not self.caches:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat([cache[block_ids[g][0]] for cache, g in zip(self.caches, self.groups)])

    def write(self, block_ids: tuple[list[int], ...], state: torch.Tensor) -> None:
        """Put a request's state (as `read` gives it) into its blocks, before the engine reads it."""
        for cache, g, layer in zip(self.caches, self.groups, state.chunk(max(len(self.caches), 1))):
            cache[block_ids[g][0]].copy_(layer)
