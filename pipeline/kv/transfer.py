"""Encoded KV between the engine's device and host memory, without stalling the engine.

Save (prefill): the connector gathers a request's blocks and encodes them on the engine's stream,
after the forward pass that wrote them and before any later step can reuse them; a side stream
then copies the encoded bytes into a pinned host buffer. The engine's thread goes on at once; the
stage's thread waits for that copy when it takes the bytes (`Download.result`).

Load (decode): the stage's thread stages a payload's bytes in a pinned buffer when it offers
them (`Upload`); at load time the connector copies them to the device and decodes them on the
side stream, and the engine's stream waits for that on the device, not on the host, before
scattering them into the cache.

Codecs run where the KV is, so fp8/int8 halve the bytes that cross PCIe and no CPU thread does
float work. Pinned buffers are pooled up to a bound; past it a transfer uses pageable memory,
which is correct but copies synchronously. The device bytes of saves still copying are bounded
too (engine/build.py takes them out of the engine's GPU memory share); past the bound a save
first waits for the oldest. On CPU the same calls are plain tensor operations.
"""

import threading
from collections import defaultdict, deque

import numpy as np
import torch

from pipeline.kv.codec import Codec, as_tensor

_MIN_BUFFER = 1 << 20


class HostBuffers:
    """Pinned host buffers pooled by power-of-two size, at most `limit` bytes pinned in all."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pinned = 0
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least nbytes: pinned, unless the bound is reached."""
        size = max(_MIN_BUFFER, 1 << (nbytes - 1).bit_length())
        with self._lock:
            if self._free[size]:
                return self._free[size].pop()
            pin = self.pinned + size <= self.limit
            self.pinned += size if pin else 0
        return torch.empty(size if pin else nbytes, dtype=torch.uint8, pin_memory=pin)

    def give(self, buffer: torch.Tensor) -> None:
        if buffer.is_pinned():
            with self._lock:
                self._free[buffer.numel()].append(buffer)


class Download:
    """A request's encoded KV on its way to host memory."""

    def __init__(self, shape: tuple[int, ...], data: torch.Tensor, copies: "DeviceCopies | None" = None):
        self.shape = shape
        self.nbytes = data.numel()
        self._data: torch.Tensor | None = data  # on the device until the copy is done
        self._copies = copies
        self._host = self._done = None
        if copies is not None:
            self._host = copies.host.take(self.nbytes)
            ready = torch.cuda.Event()
            ready.record()  # the engine's stream: the gather and encode are queued there
            with torch.cuda.stream(copies.stream):
                copies.stream.wait_event(ready)
                self._host[: self.nbytes].copy_(data, non_blocking=True)
                self._done = torch.cuda.Event()
                self._done.record(copies.stream)

    def complete(self) -> None:
        """Wait for the copy to host; the device bytes are free after it."""
        if self._done is not None:
            self._done.synchronize()
            self._data = None

    @property
    def in_flight(self) -> bool:
        return self._data is not None and self._done is not None and not self._done.query()

    def result(self) -> np.ndarray:
        """The encoded bytes, in memory of their own (a pooled pinned buffer goes back)."""
        if self._copies is None:
            return self._data.numpy()
        self.complete()
        out = self._host[: self.nbytes].numpy().copy()
        self._copies.host.give(self._host)
        self._host = None
        return out


class Upload:
    """A request's encoded KV on its way to the device, in pieces (its shared blocks, then
    the rest), staged in host memory by the stage's thread when it is offered, decoded to
    canonical KV on the device when it is loaded: only the pieces the engine lacks. The KV
    starts at token `first` (a sliding window's); recurrent layers' state, if any, follows it."""

    def __init__(
        self,
        pieces: list[tuple[np.ndarray, tuple[int, ...]]],
        dtype: torch.dtype,
        codec: Codec,
        copies: "DeviceCopies | None",
        *,
        first: int = 0,
        state: np.ndarray | None = None,
    ):
        self.dtype, self.codec, self._copies, self.first = dtype, codec, copies, first
        self.shapes = [shape for _, shape in pieces]
        sizes = [data.size for data, _ in pieces]
        self.nbytes = sum(sizes)
        self.state_nbytes = 0 if state is None else state.size
        self._offsets = np.cumsum([0, *sizes]).tolist()
        self._pieces = [as_tensor(data) for data, _ in pieces]
        self._state = None if state is None else as_tensor(state)
        self._data: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        if copies is not None:  # one pinned buffer: one copy to the device
            self._data = copies.host.take(self.nbytes + self.state_nbytes)
            for piece, start, stop in zip(self._pieces, self._offsets, self._offsets[1:]):
                self._data[start:stop].copy_(piece)
            if self._state is not None:
                self._data[self.nbytes : self.nbytes + self.state_nbytes].copy_(self._state)
            self._pieces, self._state = [], None

    def to_device(self, start: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Canonical KV on the engine's device from the piece that holds token `start` (the
        engine has the tokens before it), ready for the engine's stream; that piece's first
        token; and the state bytes, if any. Called each time the request loads (again after a
        preemption)."""
        first, offset = 0, self.first
        while first + 1 < len(self.shapes) and offset + self.shapes[first][2] <= start:
            offset += self.shapes[first][2]
            first += 1
        shapes = self.shapes[first:]
        if self._copies is None:
            return self._decode(self._pieces[first:], shapes), offset, self._state
        engine_stream = torch.cuda.current_stream()
        with torch.cuda.stream(self._copies.stream):
            end = self.nbytes + self.state_nbytes
            data = self._data[self._offsets[first] : end].to(self._copies.device, non_blocking=True)
            sizes = [b - a for a, b in zip(self._offsets[first:], self._offsets[first + 1 :])]
            *pieces, state = data.split([*sizes, self.state_nbytes])
            kv = self._decode(pieces, shapes)
            self._copied = torch.cuda.Event()
            self._copied.record(self._copies.stream)
        engine_stream.wait_event(self._copied)
        for made in (kv, state):  # made on the side stream, read on the engine's
            made.record_stream(engine_stream)
        return kv, offset, state if self.state_nbytes else None

    def _decode(self, pieces: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> torch.Tensor:
        kv = [self.codec.decode(piece, shape, self.dtype) for piece, shape in zip(pieces, shapes)]
        return kv[0] if len(kv) == 1 else torch.cat(kv, dim=2)

    def release(self) -> None:
        """Once the request has left the engine."""
        if self._copies is not None and self._data is not None:
            if self._copied is not None:
                self._copied.synchronize()
            self._copies.host.give(self._data)
            self._data = None


class DeviceCopies:
    """One engine's side stream, pinned buffers and bound on device bytes in flight."""

    def __init__(self, device: torch.device, host_limit: int, device_limit: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.host = HostBuffers(host_limit)
        self.device_limit = device_limit
        self._downloads: deque[Download] = deque()
        self._lock = threading.Lock()

    def download(self, shape: tuple[int, ...], data: torch.Tensor) -> Download:
        with self._lock:
            while self._downloads and not self._downloads[0].in_flight:
                self._downloads.popleft()
            in_flight = sum(d.nbytes for d in self._downloads)
            while self._downloads and in_flight + data.numel() > self.device_limit:
                oldest = self._downloads.popleft()
                oldest.complete()
                in_flight -= oldest.nbytes
            download = Download(shape, data, self)
            self._downloads.append(download)
        return download


def copies_for(device: torch.device, host_limit: int, device_limit: int) -> DeviceCopies | None:
    """Side-stream copies for a CUDA engine; None where the cache is in host memory already."""
    return DeviceCopies(device, host_limit, device_limit) if device.type == "cuda" else None


def download(
    kv: torch.Tensor, codec: Codec, copies: DeviceCopies | None, state: torch.Tensor | None = None
) -> Download:
    """Encode canonical KV where it is, the recurrent state's bytes after it, and start the copy
    to host memory."""
    data = codec.encode(kv)
    if state is not None and state.numel():  # raw bytes already (pipeline/kv/state.py)
        data = torch.cat([data, state])
    if copies is None:
        return Download(tuple(kv.shape), data)
    return copies.download(tuple(kv.shape), data)
