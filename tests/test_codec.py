"""KV codecs: round trips in every cache dtype, error bounds that hold per (layer, K/V, head),
encoded sizes, and decoding straight from read-only (Arrow) memory. The codecs run where the
tensor is; the device check (tests/test_device_check.py) runs them through the device copies."""

import math
import warnings

import numpy as np
import pytest
import torch

from pipeline.kv.codec import CODECS, as_tensor, codec

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A real-sized head; and odd sizes, so the scales start at an offset that is not a multiple of 4.
# Keys and values of several heads; an MLA latent (one part, one head, 576 wide).
SHAPES = [(2, 2, 33, 4, 64), (3, 2, 17, 3, 5), (3, 1, 19, 1, 576)]
NO_TOKENS = (2, 2, 0, 4, 64)


def _kv(shape, dtype, seed=0):
    """Heads whose magnitudes differ by up to 10^4, and one all-zero head."""
    g = torch.Generator().manual_seed(seed)
    layers, parts, _, heads, _ = shape
    magnitude = 10 ** torch.empty(layers, parts, 1, heads, 1).uniform_(-2, 2, generator=g)
    kv = torch.randn(shape, generator=g) * magnitude
    kv[0, parts - 1, :, 0] = 0
    return kv.to(dtype)


def _round_trip(name, kv):
    c = codec(name)
    return c.decode(c.encode(kv), tuple(kv.shape), kv.dtype)


def _assert_within_bounds(name, kv, got):
    """int8: half a step, amax / 254, per head. fp8 e4m3: half an ulp of 3 mantissa bits, 2^-4
    of the value, or half the subnormal step, 2^-10 of amax / 448, near zero. Both plus the
    rounding of the result to the cache dtype."""
    x, err = kv.double(), (got.double() - kv.double()).abs()
    amax = x.abs().amax(dim=(2, 4), keepdim=True)
    eps = torch.finfo(kv.dtype).eps
    if name == "int8":
        bound = amax * (1 + eps) / 254 + x.abs() * eps + amax * 1e-6
    else:
        bound = x.abs() * (2**-4 + eps) + amax * 2**-18
    assert (err <= bound).all(), f"{name}: worst error {(err / bound).max():.3g} x the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_keeps_shape_and_dtype_within_bounds(name, shape, dtype):
    kv = _kv(shape, dtype)
    got = _round_trip(name, kv)
    assert got.shape == kv.shape and got.dtype == kv.dtype
    if name == "none":
        assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    else:
        _assert_within_bounds(name, kv, got)
        assert torch.all(got[0, -1, :, 0] == 0), "an all-zero head decodes to zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CODECS))
def test_no_tokens_round_trip(name, dtype):
    got = _round_trip(name, torch.empty(NO_TOKENS, dtype=dtype))
    assert got.shape == NO_TOKENS and got.dtype == dtype


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_scales_are_per_head(name):
    kv = torch.randn(2, 2, 64, 2, 64, generator=torch.Generator().manual_seed(1))
    kv[:, :, :, 0] *= 1000
    got = _round_trip(name, kv)
    _assert_within_bounds(name, kv, got)
    # The small head comes back exactly as it does when encoded on its own.
    assert torch.equal(got[:, :, :, 1:], _round_trip(name, kv[:, :, :, 1:].contiguous()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [NO_TOKENS], ids=str)
@pytest.mark.parametrize("name", list(CODECS))
def test_nbytes_is_the_encoded_length(name, shape, dtype):
    assert codec(name).nbytes(shape, dtype) == codec(name).encode(_kv(shape, dtype)).numel()


@pytest.mark.parametrize("name", ["fp8", "int8"])
@pytest.mark.parametrize("tokens", [1, 16, 2000])
def test_quantised_size_is_one_byte_a_value_plus_a_scale_a_head(name, tokens):
    layers, heads, head_dim = 30, 3, 64
    shape = (layers, 2, tokens, heads, head_dim)
    size = codec(name).nbytes(shape, torch.bfloat16)
    assert size == math.prod(shape) + layers * 2 * heads * 4 == codec(name).nbytes(shape, torch.float32)
    # Half of bfloat16 and a quarter of float32, plus the scales: one float32 per head_dim
    # values of each token, so 4 / (tokens * head_dim) on top, under 1% from 16 tokens on.
    if tokens >= 16:
        assert size < 0.505 * codec("none").nbytes(shape, torch.bfloat16)
        assert size < 0.2525 * codec("none").nbytes(shape, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CODECS))
def test_decodes_read_only_memory_without_warnings(name, dtype):
    kv = _kv(SHAPES[1], dtype)
    read_only = np.frombuffer(codec(name).encode(kv).numpy().tobytes(), np.uint8)
    assert not read_only.flags.writeable
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns of non-writable arrays once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = codec(name).decode(as_tensor(read_only), tuple(kv.shape), dtype)
    finally:
        torch.set_warn_always(warn_always)
    assert torch.equal(got, _round_trip(name, kv))


def test_raw_encoding_shares_the_tensor_memory():
    kv = _kv(SHAPES[0], torch.bfloat16)
    assert np.shares_memory(codec("none").encode(kv).numpy(), kv.view(torch.uint8).numpy())


def test_wrong_size_is_refused():
    c = codec("int8")
    data = c.encode(_kv(SHAPES[0], torch.float32))
    with pytest.raises(ValueError, match="bytes"):
        c.decode(data[:-1], SHAPES[0], torch.float32)


def test_unknown_codec_names_the_known_ones():
    with pytest.raises(ValueError, match="none, fp8, int8"):
        codec("zstd")


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("tokens", [33, 32, 5, 0])
def test_blocked_codec_encodes_each_block_alone(name, tokens):
    """Per block of 16 tokens: each block's own round trip (a quantised block has its own
    scales), the size it says, and the bytes after whole blocks are the encoding of the tokens
    after them (what a payload carries past its shared blocks)."""
    kv = _kv((2, 2, tokens, 4, 8), torch.bfloat16)
    blocked = codec(name, 16)
    data = blocked.encode(kv)
    assert data.numel() == blocked.nbytes(kv.shape, kv.dtype)
    expected = torch.cat([_round_trip(name, block) for block in kv.split(16, dim=2)] or [kv], dim=2)
    assert torch.equal(blocked.decode(data, tuple(kv.shape), kv.dtype), expected)
    if tokens > 16:
        block = codec(name).nbytes((2, 2, 16, 4, 8), kv.dtype)
        assert torch.equal(data[block:], blocked.encode(kv[:, :, 16:]))
