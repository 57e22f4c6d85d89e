"""Paged KV cache <-> canonical layout.

Canonical: one tensor per request, [layers, parts, tokens, kv_heads, head_dim] (parts 2: key and
value; an MLA latent is one part of one head, kv_lora_rank + rope wide), independent of the
engine's attention backend, cache layout, block sizes and kernel ISA.

vLLM gives a connector each layer's cache as a logical view [blocks, kv_heads, block_size,
2 * head_dim] over one shared allocation. The physical order of those axes (the KV cache layout:
LBNHC "NHD", LBHNC "HND", block-outermost BL**, ...) lives in the view's strides, so indexing the
view is right for every layout. What lies on the last axis differs by backend. The CUDA backends
(FLASH_ATTN, FLASHINFER, TRITON_ATTN, FLEX_ATTENTION) split it into the key then the value of
each token. The CPU backend keeps, per (block, head), the key rows then the value rows, in an
order its kernel chooses per ISA; so that order is measured once, by letting the kernel itself
write a block of known values. Converting whole blocks and cutting tokens in the canonical
layout keeps partial blocks right.

The views are in the kernel's blocks, which may be smaller than the scheduler's blocks whose ids
the connector receives: scheduler block b is kernel blocks b*r ... b*r + r-1, r = scheduler
block size / kernel block size (vLLM's `group_kernel_blocks`). `PagedCache` maps them.

MLA backends keep one latent per token, token-major: [blocks, 1, block_size, latent] (or without
the head axis), the same addressing with one part.
"""

import torch

SPLIT_KEY_VALUE = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION")
LATENT = ("CPU_MLA", "TRITON_MLA", "FLASHMLA", "FLASHINFER_MLA", "CUTLASS_MLA", "FLASH_ATTN_MLA")
SUPPORTED = (*SPLIT_KEY_VALUE, "CPU_ATTN", *LATENT)


class PagedCache:
    """Every layer's paged cache of one engine, addressed in the scheduler's blocks."""

    def __init__(
        self,
        caches: list[torch.Tensor],
        backend: str,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        isa: str | None = None,
    ):
        """`head_dim`: of a key or value, or an MLA latent's width."""
        if backend not in SUPPORTED:
            raise NotImplementedError(
                f"KV transfer does not support attention backend {backend}; supported: {', '.join(SUPPORTED)}"
            )
        parts = 1 if backend in LATENT else 2
        caches = [cache.unsqueeze(1) if cache.dim() == 3 else cache for cache in caches]  # MLA without heads
        first = caches[0]
        kernel_block_size = first.shape[2]
        if block_size % kernel_block_size or first.shape[0] % (block_size // kernel_block_size):
            raise NotImplementedError(
                f"KV cache views of {first.shape[0]} blocks of {kernel_block_size} tokens do not divide "
                f"the scheduler's {block_size}-token blocks"
            )
        for cache in caches:
            if cache.dtype != dtype or cache.shape[3] != parts * head_dim or cache.shape[1:] != first.shape[1:]:
                what = "MLA latents of width" if parts == 1 else "keys and values of head size"
                raise NotImplementedError(
                    f"KV cache view {tuple(cache.shape)} {cache.dtype} is not plain {what} {head_dim} in {dtype} "
                    "(a quantised, padded or mixed cache): KV transfer supports plain ones only"
                )
        self.block_size = block_size
        self.ratio = block_size // kernel_block_size
        self.layers = [PagedLayer(cache, backend, isa, parts) for cache in caches]

    def kernel_blocks(self, block_ids: list[int]) -> list[int]:
        return [b * self.ratio + j for b in block_ids for j in range(self.ratio)]

    def gather(self, block_ids: list[int], start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) of a request, copied out of its blocks in canonical layout, on
        the cache's device."""
        first = self.layers[0]
        skipped = start // first.block_size
        blocks = self.kernel_blocks(block_ids)[skipped : -(-stop // first.block_size)]
        index = _index(blocks, first.cache.device)
        out = torch.empty(
            len(self.layers),
            first.parts,
            stop - skipped * first.block_size,
            first.kv_heads,
            first.head_dim,
            dtype=first.cache.dtype,
            device=first.cache.device,
        )
        for layer, tokens in zip(self.layers, out):
            layer.read_into(tokens, blocks, index)
        return out[:, :, start - skipped * first.block_size :]

    def scatter(self, block_ids: list[int], kv: torch.Tensor, start: int, stop: int, offset: int = 0) -> None:
        """Write canonical tokens [start, stop) into a request's blocks, from `kv` holding the
        tokens from `offset` on; start is on a scheduler block boundary. Slots past `stop` in
        the last block are the engine's to write when it computes those tokens. Tokens before
        `offset` are outside a sliding window: their blocks are the engine's null block, and the
        slots before `offset` in its first real block are never attended to (written as zeros)."""
        assert start % self.block_size == 0, "loads start on a block boundary"
        if offset > start:
            start = offset - offset % self.block_size
            kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, offset - start, 0))
            offset = start
        bs = self.layers[0].block_size
        blocks = self.kernel_blocks(block_ids)[start // bs : -(-stop // bs)]
        index = _index(blocks, self.layers[0].cache.device)
        for layer, tokens in zip(self.layers, kv):
            layer.write_from(tokens[:, start - offset : stop - offset], blocks, index)


def _index(blocks: list[int], device: torch.device) -> torch.Tensor:
    """One block-id tensor per transfer, shared by every layer; staged through pinned memory
    so that building it does not wait for the device."""
    ids = torch.tensor(blocks, dtype=torch.long)
    if device.type == "cpu":
        return ids
    return ids.pin_memory().to(device, non_blocking=True)


class PagedLayer:
    """One layer's paged cache in kernel blocks, read and written as canonical tokens."""

    def __init__(self, cache: torch.Tensor, backend: str, isa: str | None = None, parts: int = 2):
        self.cache = cache
        self.parts = parts
        self.num_blocks, self.kv_heads, self.block_size, width = cache.shape
        self.head_dim = width // parts
        self._order = self._strided = None
        if backend == "CPU_ATTN":
            # order[i]: where, inside one (block, head), the kernel keeps canonical element i
            # of [2, block_size, head_dim].
            self._order = _measure_cpu_block_order(self.block_size, self.head_dim, cache.dtype, isa)
            self._strided = _as_strided_halves(self._order, self.block_size, self.head_dim)

    def read_into(self, out: torch.Tensor, blocks: list[int], index: torch.Tensor) -> None:
        """Copy the first tokens of `blocks` into `out`, canonical [parts, tokens, H, D]."""
        tokens = out.shape[1]
        if self._strided:  # one strided copy per block and half, straight from the cache
            for i, block in enumerate(blocks):
                start, stop = i * self.block_size, min((i + 1) * self.block_size, tokens)
                for half, view in zip(out, self._halves(self.cache[block : block + 1])):
                    half[start:stop].copy_(view[0, : stop - start])
            return
        out.copy_(self.read(index).transpose(0, 1).flatten(1, 2)[:, :tokens])

    def write_from(self, tokens: torch.Tensor, blocks: list[int], index: torch.Tensor) -> None:
        """Write canonical tokens [parts, n, H, D] into `blocks` from the first slot of the first."""
        tokens = tokens.to(device=self.cache.device, dtype=self.cache.dtype)
        if self._strided:
            for i, block in enumerate(blocks):
                part = tokens[:, i * self.block_size : (i + 1) * self.block_size]
                for half, view in zip(part, self._halves(self.cache[block : block + 1])):
                    view[0, : part.shape[1]].copy_(half)
            return
        full, rest = divmod(tokens.shape[1], self.block_size)
        if self._order is None:  # keys and values side by side: whole blocks, then the tail's slots
            if full:
                self.write(
                    index[:full],
                    tokens[:, : full * self.block_size].unflatten(1, (full, self.block_size)).transpose(0, 1),
                )
            if rest:
                self.cache[blocks[full], :, :rest] = tokens[:, full * self.block_size :].permute(2, 1, 0, 3).flatten(-2)
            return
        pad = (self.block_size - rest) % self.block_size
        padded = torch.nn.functional.pad(tokens, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, self.block_size))
        self.write(index[: padded.shape[1]], padded.transpose(0, 1))

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """Whole blocks as [n, parts, block_size, H, D]."""
        picked = self.cache.index_select(0, index)  # [n, H, bs, parts * D]
        if self._order is None:
            return picked.unflatten(-1, (self.parts, self.head_dim)).permute(0, 3, 2, 1, 4)
        canonical = picked.flatten(2).index_select(2, self._order)
        return canonical.view(-1, self.kv_heads, 2, self.block_size, self.head_dim).permute(0, 2, 3, 1, 4)

    def write(self, index: torch.Tensor, blocks: torch.Tensor) -> None:
        """Whole blocks from [n, parts, block_size, H, D]."""
        if self._order is None:
            self.cache[index] = blocks.permute(0, 3, 2, 1, 4).flatten(-2)
            return
        canonical = blocks.permute(0, 3, 1, 2, 4).flatten(2)  # [n, H, 2*bs*D]
        paged = torch.empty_like(canonical)
        paged[:, :, self._order] = canonical
        self.cache[index] = paged.view(-1, self.kv_heads, self.block_size, 2 * self.head_dim)

    def _halves(self, paged: torch.Tensor) -> list[torch.Tensor]:
        """Views of the key and value parts of CPU blocks [n, H, bs, 2D], each as
        [n, bs, H, D]; a half kept dimension-major is a transposed view."""
        n, bs, d = paged.shape[0], self.block_size, self.head_dim
        views = []
        for part, dim_major in zip(paged.flatten(2).chunk(2, dim=2), self._strided):
            if dim_major:
                views.append(part.view(n, self.kv_heads, d, bs).permute(0, 3, 1, 2))
            else:
                views.append(part.view(n, self.kv_heads, bs, d).permute(0, 2, 1, 3))
        return views


def _measure_cpu_block_order(block_size: int, head_dim: int, dtype: torch.dtype, isa: str | None) -> torch.Tensor:
    from vllm import _custom_ops as ops

    size = 2 * block_size * head_dim
    canonical = torch.arange(size).view(2, block_size, 1, head_dim)
    scratch = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = scratch.view(1, 1, 2 * block_size, head_dim).chunk(2, dim=2)
    # Base-256 digits, one pass each, so the probe is exact even in 8-bit-mantissa dtypes.
    found = torch.zeros(size, dtype=torch.long)
    for scale in (1, 256):
        digit = (canonical // scale % 256).to(dtype)
        scratch.zero_()
        ops.cpu_attn_reshape_and_cache(
            digit[0].contiguous(), digit[1].contiguous(), key_cache, value_cache, torch.arange(block_size), isa
        )
        found += scratch.flatten().long() * scale
    if not torch.equal(found.sort().values, torch.arange(size)):
        raise NotImplementedError(f"cannot map the CPU attention kernel's block layout (isa={isa})")
    order = torch.empty(size, dtype=torch.long)
    order[found] = torch.arange(size)
    return order


def _as_strided_halves(order: torch.Tensor, block_size: int, head_dim: int) -> tuple[bool, bool] | None:
    """When the kernel keeps keys then values, each either token-major [bs, D] or
    dimension-major [D, bs] (the common ISAs), per half whether it is dimension-major: then
    blocks convert with strided views instead of a gather by index. None otherwise."""
    half = block_size * head_dim
    token_major = torch.arange(half)
    dim_major = torch.arange(half).view(head_dim, block_size).t().flatten()
    layouts = []
    for start, positions in zip((0, half), order.view(2, half)):
        if torch.equal(positions - start, token_major):
            layouts.append(False)
        elif torch.equal(positions - start, dim_major):
            layouts.append(True)
        else:
            return None
    return layouts[0], layouts[1]
