"""KV codecs: a canonical KV tensor [layers, parts, tokens, kv_heads, head_dim] to the flat bytes a
payload ships, and back, on the tensor's device (the engine's GPU, so fewer bytes cross PCIe). "none" ships the cache dtype's raw bytes; "fp8" and "int8" ship one
byte per value plus a float32 scale per (layer, part, kv_head), roughly halving a bfloat16
payload. Scales are per head because heads differ in magnitude by orders of ten: one scale for the
whole tensor would flush the small heads to zero."""

import math
import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch


class Codec(ABC):
    name: str

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """The bytes to ship, as a 1-D uint8 tensor on kv's device."""

    @abstractmethod
    def decode(self, data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The KV tensor of `shape` and `dtype` that the uint8 `data` encodes, on its device."""

    @abstractmethod
    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Encoded size of a KV tensor of `shape` and `dtype`, equal to len(encode(kv))."""


class Raw(Codec):
    """The tensor's own bytes: no copy to encode a contiguous tensor, none to decode. Viewing
    as uint8 also carries bfloat16, which numpy lacks."""

    name = "none"

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.contiguous().view(torch.uint8).reshape(-1)

    def decode(self, data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        _check_size(self, data, shape, dtype)
        return data.view(dtype).view(shape)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize


class Scaled(Codec):
    """Symmetric one-byte quantisation, scale = amax / qmax per (layer, part, kv_head), the amax
    taken over tokens and head_dim. Blob: the values in canonical order, then the float32
    scales [layers, parts, kv_heads] (parts: key and value, or an MLA latent)."""

    def __init__(self, name: str, storage: torch.dtype, qmax: float):
        self.name, self.storage, self.qmax = name, storage, qmax

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        layers, parts, _, heads, _ = kv.shape
        if kv.numel():
            amax = torch.maximum(kv.amax(dim=(2, 4)), -kv.amin(dim=(2, 4))).float()
        else:  # amax over an empty dim is an error; the scales are never used
            amax = torch.zeros(layers, parts, heads, device=kv.device)
        scales = torch.where(amax > 0, amax / self.qmax, 1.0)  # an all-zero head stays zero
        # Dividing promotes to float32, so the in-place steps below never touch kv.
        scaled = kv / scales[:, :, None, :, None]
        if not self.storage.is_floating_point:
            scaled.round_()
        scaled.clamp_(-self.qmax, self.qmax)
        out = torch.empty(self.nbytes(kv.shape, kv.dtype), dtype=torch.uint8, device=kv.device)
        values = kv.numel()
        out[:values].view(self.storage).view(kv.shape).copy_(scaled)
        out[values:] = scales.view(torch.uint8).reshape(-1)
        return out

    def decode(self, data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        _check_size(self, data, shape, dtype)
        values = math.prod(shape)
        # The scales may start at an offset that is not a multiple of 4: copy their few bytes.
        scales = data[values:].clone().view(torch.float32).view(shape[0], shape[1], shape[3])
        q = data[:values].view(self.storage).view(shape)
        return q.float().mul_(scales[:, :, None, :, None]).to(dtype)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        layers, parts, _, heads, _ = shape
        return math.prod(shape) + layers * parts * heads * 4


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Raw(),
        Scaled("fp8", torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max),
        Scaled("int8", torch.int8, 127.0),
    )
}


class Blocked(Codec):
    """Another codec applied to each block of `block_tokens` tokens on its own (the last block
    may be shorter), the blocks' bytes one after the other: a run of whole blocks is then bytes
    of its own, which is how a block shared by many prompts travels once (pipeline/kv/blocks.py)."""

    def __init__(self, inner: Codec, block_tokens: int):
        self.inner, self.block_tokens, self.name = inner, block_tokens, inner.name

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        if kv.shape[2] <= self.block_tokens:
            return self.inner.encode(kv)
        return torch.cat([self.inner.encode(block) for block in kv.split(self.block_tokens, dim=2)])

    def decode(self, data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        _check_size(self, data, shape, dtype)
        shapes = self.block_shapes(shape)
        if len(shapes) == 1:
            return self.inner.decode(data, shape, dtype)
        sizes = [self.inner.nbytes(s, dtype) for s in shapes]
        blocks = [self.inner.decode(d, s, dtype) for d, s in zip(data.split(sizes), shapes)]
        return torch.cat(blocks, dim=2)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return sum(self.inner.nbytes(s, dtype) for s in self.block_shapes(shape))

    def block_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        tokens = shape[2]
        full, rest = divmod(tokens, self.block_tokens)
        counts = [self.block_tokens] * full + ([rest] if rest or not tokens else [])
        return [(*shape[:2], n, *shape[3:]) for n in counts]


def codec(name: str, block_tokens: int = 0) -> Codec:
    """The codec `name`, applied per block of `block_tokens` tokens where that is not 0."""
    if name not in CODECS:
        raise ValueError(f"unknown KV codec {name!r}; known: {', '.join(CODECS)}")
    return Blocked(CODECS[name], block_tokens) if block_tokens else CODECS[name]


def _check_size(c: Codec, data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    expected = c.nbytes(shape, dtype)
    if data.numel() != expected:
        raise ValueError(f"{c.name} KV data has {data.numel()} bytes, {expected} expected for {shape} {dtype}")


def as_tensor(data: np.ndarray) -> torch.Tensor:
    """A uint8 tensor sharing data's memory."""
    if not data.size:  # an empty array may have stride 0, which dtype views refuse
        return torch.empty(0, dtype=torch.uint8)
    if data.flags.writeable:
        return torch.from_numpy(data)
    with warnings.catch_warnings():
        # Arrow buffers are read-only, which torch tensors cannot express. Decoded KV is only
        # read (copied into the paged cache), never written, so sharing the memory is safe.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data)
