"""Paged CPU cache <-> canonical KV: the strided fast path reads and writes exactly what the
gather-by-measured-order path does, for every cut of a request's blocks."""

import pytest
import torch

from pipeline.kv.layout import PagedLayer, gather_tokens, scatter_tokens

LAYERS, HEADS, HEAD_DIM, BLOCK = 4, 3, 64, 128
BLOCKS = [5, 9, 2, 40]


def _layers(strided: bool, seed: int = 0) -> list[PagedLayer]:
    g = torch.Generator().manual_seed(seed)
    layers = [
        PagedLayer(torch.randn(64, HEADS, BLOCK, 2 * HEAD_DIM, generator=g), "CPU_ATTN", "vec") for _ in range(LAYERS)
    ]
    if not strided:
        for layer in layers:
            layer._strided = None  # force the general path
    return layers


def test_the_kernel_layout_is_recognised_as_strided():
    assert _layers(True)[0]._strided is not None


@pytest.mark.parametrize("tokens", [1, 127, 128, 129, 300, 512])
def test_strided_and_general_paths_agree(tokens):
    fast, general = _layers(True), _layers(False)
    assert torch.equal(gather_tokens(fast, BLOCKS, tokens), gather_tokens(general, BLOCKS, tokens))
    kv = torch.randn(LAYERS, 2, tokens, HEADS, HEAD_DIM)
    for start in (0, BLOCK):
        stop = max(tokens - 1, 1)  # decode loads all but the last prompt token
        if start >= stop:
            continue
        for layers in (fast, general):
            scatter_tokens(layers, BLOCKS, kv, start, stop)
            assert torch.equal(gather_tokens(layers, BLOCKS, stop)[:, :, start:], kv[:, :, start:stop])
