"""Paged KV cache <-> canonical layout.

Canonical: one tensor per request, [layers, 2, tokens, kv_heads, head_dim] (2 = key, value),
independent of the engine's attention backend, block size and kernel ISA.

Every backend's per-layer cache is [blocks, kv_heads, block_size, 2 * head_dim], but what lies
inside a block differs. The flash-attention family stores each token's key and value side by
side. The CPU backend stores, per (block, head), the key rows then the value rows, in an order
its kernel chooses per ISA; so the order is measured once, by letting the kernel itself write a
block of known values. Converting whole blocks and cutting tokens in the canonical layout keeps
partial blocks right.
"""

import torch


class PagedLayer:
    """One layer's paged cache, read and written as [blocks, 2, block_size, kv_heads, head_dim]."""

    def __init__(self, cache: torch.Tensor, backend: str, isa: str | None = None):
        self.cache = cache
        self.num_blocks, self.kv_heads, self.block_size, width = cache.shape
        self.head_dim = width // 2
        self._order = self._strided = None
        if backend == "CPU_ATTN":
            # order[i]: where, inside one (block, head), the kernel keeps canonical element i
            # of [2, block_size, head_dim].
            self._order = _measure_cpu_block_order(self.block_size, self.head_dim, cache.dtype, isa)
            self._strided = _as_strided_halves(self._order, self.block_size, self.head_dim)
        elif backend not in ("FLASH_ATTN", "TRITON_ATTN"):
            raise NotImplementedError(
                f"KV transfer does not support attention backend {backend}; "
                "supported: CPU_ATTN, FLASH_ATTN, TRITON_ATTN"
            )

    def read_into(self, out: torch.Tensor, block_ids: list[int]) -> None:
        """Copy the first tokens of blocks into `out`, canonical [2, tokens, H, D]."""
        tokens = out.shape[1]
        if self._strided:  # one strided copy per block and half, straight from the cache
            for i, block in enumerate(block_ids):
                start, stop = i * self.block_size, min((i + 1) * self.block_size, tokens)
                for half, view in zip(out, self._halves(self.cache[block : block + 1])):
                    half[start:stop].copy_(view[0, : stop - start])
            return
        ids = torch.tensor(block_ids, device=self.cache.device)
        out.copy_(self.read(ids).transpose(0, 1).flatten(1, 2)[:, :tokens])

    def write_from(self, tokens: torch.Tensor, block_ids: list[int]) -> None:
        """Write canonical tokens [2, n, H, D] into blocks from the first slot of block_ids[0]."""
        tokens = tokens.to(device=self.cache.device, dtype=self.cache.dtype)
        if self._strided:
            for i, block in enumerate(block_ids):
                part = tokens[:, i * self.block_size : (i + 1) * self.block_size]
                for half, view in zip(part, self._halves(self.cache[block : block + 1])):
                    view[0, : part.shape[1]].copy_(half)
            return
        pad = len(block_ids) * self.block_size - tokens.shape[1]
        blocks = torch.nn.functional.pad(tokens, (0, 0, 0, 0, 0, pad)).unflatten(1, (len(block_ids), self.block_size))
        self.write(torch.tensor(block_ids, device=self.cache.device), blocks.transpose(0, 1))

    def read(self, block_ids: torch.Tensor) -> torch.Tensor:
        picked = self.cache.index_select(0, block_ids)  # [n, H, bs, 2D]
        if self._order is None:
            return picked.unflatten(-1, (2, self.head_dim)).permute(0, 3, 2, 1, 4)
        canonical = picked.flatten(2).index_select(2, self._order)
        return canonical.view(-1, self.kv_heads, 2, self.block_size, self.head_dim).permute(0, 2, 3, 1, 4)

    def write(self, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
        if self._order is None:
            self.cache[block_ids] = blocks.permute(0, 3, 2, 1, 4).flatten(-2)
            return
        canonical = blocks.permute(0, 3, 1, 2, 4).flatten(2)  # [n, H, 2*bs*D]
        paged = torch.empty_like(canonical)
        paged[:, :, self._order] = canonical
        self.cache[block_ids] = paged.view(-1, self.kv_heads, self.block_size, 2 * self.head_dim)

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


def gather_tokens(layers: list[PagedLayer], block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """Copy the first num_tokens of a request out of its blocks, in canonical layout."""
    first = layers[0]
    blocks = block_ids[: -(-num_tokens // first.block_size)]
    out = torch.empty(
        len(layers), 2, num_tokens, first.kv_heads, first.head_dim, dtype=first.cache.dtype, device=first.cache.device
    )
    for layer, tokens in zip(layers, out):
        layer.read_into(tokens, blocks)
    return out


def scatter_tokens(layers: list[PagedLayer], block_ids: list[int], kv: torch.Tensor, start: int, stop: int) -> None:
    """Write canonical tokens [start, stop) into a request's blocks; start is block-aligned.
    Slots past `stop` in the last block are left as they are: the engine writes them when it
    computes those tokens."""
    block_size = layers[0].block_size
    assert start % block_size == 0, "loads start on a block boundary"
    blocks = block_ids[start // block_size : -(-stop // block_size)]
    for layer, tokens in zip(layers, kv):
        layer.write_from(tokens[:, start:stop], blocks)
