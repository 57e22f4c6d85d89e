"""Paged cache <-> canonical KV, on caches built by vLLM's own allocation code.

The CUDA backends' caches are allocated here on CPU with vLLM's `allocate_kv_cache` for every KV
cache layout, dtype and head size, with kernel blocks equal to or smaller than the scheduler's;
known values are written where the kernels write them (through the key/value split of the view
every CUDA backend's forward takes), then gathered, encoded, decoded and scattered into a second
cache under other block ids, and read back exactly. The CPU backend's layout is measured from
its kernel; its strided fast path must agree with the general one."""

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    AttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from pipeline.kv.codec import codec
from pipeline.kv.layout import SPLIT_KEY_VALUE, PagedCache
from pipeline.kv.state import StateCache

LAYERS, HEADS, BLOCK, NUM_BLOCKS = 3, 2, 32, 12


def vllm_caches(
    layout: KVCacheLayout, dtype: torch.dtype, head_dim: int, kernel_block: int, layers: int = LAYERS
) -> list[torch.Tensor]:
    """Per-layer views as a vLLM worker registers them with its connector."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=head_dim, dtype=dtype)
    return allocated(spec, layout, kernel_block, layers)


def allocated(spec: AttentionSpec, layout: KVCacheLayout, kernel_block: int, layers: int) -> list[torch.Tensor]:
    """Each layer's view of one allocation, made by vLLM's own code."""
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, layers, layout)
    tensor = KVCacheTensor(
        size=spec.page_size_bytes * NUM_BLOCKS * layers,
        layers=names,
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    config = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[tensor], kv_cache_groups=[KVCacheGroupSpec(names, spec)]
    )
    caches = allocate_kv_cache(config, torch.device("cpu"), layout, [kernel_block])
    return [caches[name] for name in names]


def write_like_kernel(caches: list[torch.Tensor], block_ids: list[int], kv: torch.Tensor) -> None:
    """Token t of a request lands in slot t % kernel_block of kernel block
    block_ids[t // BLOCK] * ratio + t % BLOCK // kernel_block, key and value as the backends
    split the view: `cache.transpose(1, 2).split(head_size, dim=-1)`."""
    kernel_block = caches[0].shape[2]
    ratio = BLOCK // kernel_block
    for cache, layer in zip(caches, kv):
        keys, values = cache.transpose(1, 2).split(kv.shape[-1], dim=-1)
        for t in range(kv.shape[2]):
            block = block_ids[t // BLOCK] * ratio + t % BLOCK // kernel_block
            keys[block, t % kernel_block] = layer[0, t]
            values[block, t % kernel_block] = layer[1, t]


def read_like_kernel(caches: list[torch.Tensor], block_ids: list[int], tokens: range) -> torch.Tensor:
    kernel_block = caches[0].shape[2]
    ratio = BLOCK // kernel_block
    out = []
    for cache in caches:
        keys, values = cache.transpose(1, 2).split(cache.shape[-1] // 2, dim=-1)
        slots = [(block_ids[t // BLOCK] * ratio + t % BLOCK // kernel_block, t % kernel_block) for t in tokens]
        out.append(torch.stack([torch.stack([half[b, s] for b, s in slots]) for half in (keys, values)]))
    return torch.stack(out)


@pytest.mark.parametrize("kernel_block", [BLOCK, BLOCK // 2])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda layout: layout.name)
def test_every_cuda_layout_round_trips_exactly(layout, dtype, head_dim, kernel_block):
    if kernel_block != BLOCK and layout.stride_order[:2] != (0, 1):
        # Only layer-then-block layouts keep a block one dense page: vLLM refuses the split.
        with pytest.raises(ValueError, match="kernel blocks"):
            vllm_caches(layout, dtype, head_dim, kernel_block)
        return
    tokens = 2 * BLOCK + 7  # a partial last block
    kv = torch.randn(LAYERS, 2, tokens, HEADS, head_dim, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    sent, received = [4, 0, 9], [2, 11, 5]
    raw = codec("none")
    for backend in SPLIT_KEY_VALUE:
        prefill = vllm_caches(layout, dtype, head_dim, kernel_block)
        write_like_kernel(prefill, sent, kv)
        gathered = PagedCache(prefill, backend, BLOCK, head_dim, dtype).gather(sent, 0, tokens)
        assert torch.equal(gathered, kv), backend
        shipped = raw.decode(raw.encode(gathered), tuple(kv.shape), dtype)

        decode = vllm_caches(layout, dtype, head_dim, kernel_block)
        cache = PagedCache(decode, backend, BLOCK, head_dim, dtype)
        # Decode loads all but the last prompt token, from a block boundary: 0, or after a
        # prefix-cache hit.
        for start in (0, BLOCK):
            cache.scatter(received, shipped, start, tokens - 1)
            assert torch.equal(read_like_kernel(decode, received, range(start, tokens - 1)), kv[:, :, start:-1])
        untouched = [
            b for b in range(NUM_BLOCKS * BLOCK // kernel_block) if b // (BLOCK // kernel_block) not in received
        ]
        assert not any(c[untouched].any() for c in decode), f"{backend} wrote outside the request's blocks"


def test_caches_that_are_not_plain_keys_and_values_are_refused():
    caches = vllm_caches(KVCacheLayout.LBNHC, torch.bfloat16, 64, BLOCK)
    with pytest.raises(NotImplementedError, match="not plain keys and values of head size 128"):
        PagedCache(caches, "FLASH_ATTN", BLOCK, 128, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="quantised"):
        PagedCache([c.view(torch.uint8)[..., :128] for c in caches], "FLASH_ATTN", BLOCK, 64, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="do not divide the scheduler's 48-token blocks"):
        PagedCache(caches, "FLASH_ATTN", 48, 64, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="attention backend ROCM_ATTN"):
        PagedCache(caches, "ROCM_ATTN", BLOCK, 64, torch.bfloat16)


CPU_HEAD_DIM, CPU_BLOCK = 64, 128
CPU_BLOCKS = [5, 9, 2, 40]


def _cpu_cache(strided: bool, seed: int = 0) -> PagedCache:
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(64, HEADS, CPU_BLOCK, 2 * CPU_HEAD_DIM, generator=g) for _ in range(4)]
    cache = PagedCache(caches, "CPU_ATTN", CPU_BLOCK, CPU_HEAD_DIM, torch.float32, isa="vec")
    if not strided:
        for layer in cache.layers:
            layer._strided = None  # force the general path
    return cache


def test_the_cpu_kernel_layout_is_recognised_as_strided():
    assert _cpu_cache(True).layers[0]._strided is not None


@pytest.mark.parametrize("tokens", [1, 127, 128, 129, 300, 512])
def test_cpu_strided_and_general_paths_agree(tokens):
    fast, general = _cpu_cache(True), _cpu_cache(False)
    assert torch.equal(fast.gather(CPU_BLOCKS, 0, tokens), general.gather(CPU_BLOCKS, 0, tokens))
    kv = torch.randn(4, 2, tokens, HEADS, CPU_HEAD_DIM)
    for start in (0, CPU_BLOCK):
        stop = max(tokens - 1, 1)  # decode loads all but the last prompt token
        if start >= stop:
            continue
        for cache in (fast, general):
            cache.scatter(CPU_BLOCKS, kv, start, stop)
            assert torch.equal(cache.gather(CPU_BLOCKS, start, stop), kv[:, :, start:stop])
            # A save from a shared block's end, inside a cache block: the tokens from there.
            assert torch.equal(cache.gather(CPU_BLOCKS, start + 64, stop), kv[:, :, start + 64 : stop])


def mla_caches(layout: KVCacheLayout, dtype: torch.dtype, block: int, layers: int = LAYERS) -> list[torch.Tensor]:
    """Per-layer MLA views as vLLM allocates them: [blocks, 1, block, kv_lora_rank + rope]."""
    return allocated(
        MLAAttentionSpec(block_size=block, num_kv_heads=1, head_size=LATENT, dtype=dtype), layout, block, layers
    )


LATENT = 512 + 64


@pytest.mark.parametrize("squeezed", [False, True], ids=["4d", "3d"])
@pytest.mark.parametrize("backend, block", [("CPU_MLA", 16), ("FLASHMLA", 64), ("TRITON_MLA", 16)])
def test_mla_latents_round_trip_exactly(backend, block, squeezed):
    """Written where the MLA kernels write a token's latent (`cache.view(-1, latent)[slot]`), in
    canonical layout one part of one head; with or without the head axis."""
    tokens = 3 * block + 5
    kv = torch.randn(LAYERS, 1, tokens, 1, LATENT, generator=torch.Generator().manual_seed(block)).bfloat16()
    sent, received = [4, 0, 9, 7], [2, 11, 5, 1]
    prefill = mla_caches(KVCacheLayout.LBNHC, torch.bfloat16, block)
    for cache, layer in zip(prefill, kv):
        flat = cache.view(-1, LATENT)
        for t in range(tokens):
            flat[sent[t // block] * block + t % block] = layer[0, t, 0]
    views = [c.squeeze(1) for c in prefill] if squeezed else prefill
    gathered = PagedCache(views, backend, block, LATENT, torch.bfloat16).gather(sent, 0, tokens)
    assert torch.equal(gathered, kv)
    decode = mla_caches(KVCacheLayout.LBNHC, torch.bfloat16, block)
    PagedCache(decode, backend, block, LATENT, torch.bfloat16).scatter(received, gathered, block, tokens - 1)
    for cache, layer in zip(decode, kv):
        flat = cache.view(-1, LATENT)
        assert torch.equal(
            torch.stack([flat[received[t // block] * block + t % block] for t in range(block, tokens - 1)]),
            layer[0, block : tokens - 1, 0],
        )


def test_a_window_is_loaded_into_its_blocks_alone():
    """A sliding window's KV from token 40 on: the engine's block before it is its null block
    (id 0), left as it is; the slots before 40 in the window's first block hold zeros."""
    tokens, first = 3 * BLOCK + 7, BLOCK + 8
    kv = torch.randn(LAYERS, 2, tokens - first, HEADS, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    decode = vllm_caches(KVCacheLayout.LBNHC, torch.bfloat16, 64, BLOCK)
    for c in decode:
        c[0] = 1  # the null block
    cache = PagedCache(decode, "FLASH_ATTN", BLOCK, 64, torch.bfloat16)
    received = [0, 11, 5, 7]
    cache.scatter(received, kv, 0, tokens - 1, offset=first)
    window = range(first, tokens - 1)
    assert torch.equal(read_like_kernel(decode, received, window), kv[:, :, : len(window)])
    zeros = read_like_kernel(decode, received, range(BLOCK, first))
    assert not zeros.any() and zeros.shape[2] == first - BLOCK
    assert all(bool((c[0] == 1).all()) for c in decode)
    assert torch.equal(cache.gather(received, first, tokens - 1), kv[:, :, : len(window)])


def test_recurrent_state_moves_whole_from_padded_pages():
    """Each recurrent layer's state bytes, read from the request's state block of its group and
    written into another engine's, however far apart padded pages lie."""
    state, page, num_blocks = 1000, 4096, 6
    g = torch.Generator().manual_seed(0)

    def engine() -> list[torch.Tensor]:  # two layers' views [blocks, 1, 1, state] over padded pages
        return [torch.zeros(num_blocks, page, dtype=torch.int8)[:, None, None, :state] for _ in range(2)]

    prefill, decode = engine(), engine()
    for cache in prefill:
        cache.copy_(torch.randint(-128, 128, cache.shape, generator=g, dtype=torch.int8))
    sent, received = ([9], [3], [4]), ([9], [1], [2])  # an attention group's ids, then one per recurrent group
    read = StateCache(prefill, [1, 2], state).read(sent)
    assert torch.equal(read, torch.cat([prefill[0][3].flatten(), prefill[1][4].flatten()]).view(torch.uint8))
    StateCache(decode, [1, 2], state).write(received, read)
    assert torch.equal(decode[0][1], prefill[0][3]) and torch.equal(decode[1][2], prefill[1][4])
    others = [b for b in range(num_blocks) if b != 1], [b for b in range(num_blocks) if b != 2]
    assert not decode[0][others[0]].any() and not decode[1][others[1]].any()
    with pytest.raises(NotImplementedError, match="not 999 bytes per request"):
        StateCache(prefill, [1, 2], state - 1)
