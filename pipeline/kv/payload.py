"""The KV payload: one request's prompt KV as it travels from prefill to decode, in one Arrow
struct column that round-trips through Ray's object store and Parquet without pickle.

Format 2: the KV in canonical layout [layers, 2 (K, V), tokens, kv_heads, head_dim], encoded by
a codec (pipeline.kv.codec), plus what decode needs to refuse a payload it must not use: the
model fingerprint, cache dtype, codec, shape and an XXH3-64 checksum of the encoded bytes (a
hash ~7x faster than CRC32 here, and the check runs over every byte on both sides). The bytes are
inline, or in a file named by `file` (pipeline.kv.store)."""

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import xxhash

from pipeline.columns import KV_PAYLOAD, ErrorKind, row_error
from pipeline.engine.model import ResolvedModel
from pipeline.kv.codec import CODECS, as_tensor, codec
from pipeline.kv.transfer import DeviceCopies, Upload

FORMAT = 2
TYPE = pa.struct(
    [
        ("format", pa.int16()),
        ("fingerprint", pa.string()),
        ("dtype", pa.string()),
        ("codec", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("checksum", pa.uint64()),
        ("data", pa.large_binary()),
        ("file", pa.string()),
    ]
)
OPTIONAL = ("file",)  # every other field of a payload must be set


class PayloadError(ValueError):
    def __init__(self, kind: ErrorKind, detail: str):
        super().__init__(row_error(kind, detail))


class PayloadMismatch(PayloadError):
    """Made for another engine (model, format, shape): refused, never recomputed."""


class PayloadLost(PayloadError):
    """Missing or damaged on the way: decode may recompute it (kv.on_load_failure)."""


@dataclass(frozen=True)
class KVPayload:
    fingerprint: str
    dtype: str
    codec: str
    shape: tuple[int, ...]
    checksum: int
    data: np.ndarray  # uint8; on the decode side a read-only view of the Arrow buffer
    format: int = FORMAT
    file: str | None = None  # where the bytes are when they are not inline

    @classmethod
    def of(cls, data: np.ndarray, shape: tuple[int, ...], model: ResolvedModel, codec_name: str) -> "KVPayload":
        """The payload of KV of `shape` that `codec_name` encoded as `data`."""
        return cls(model.fingerprint, model.dtype, codec_name, shape, checksum(data), data)

    @classmethod
    def encode(cls, kv: torch.Tensor, model: ResolvedModel, codec_name: str) -> "KVPayload":
        return cls.of(codec(codec_name).encode(kv).cpu().numpy(), tuple(kv.shape), model, codec_name)

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """The size of the encoded bytes that its codec, shape and dtype make (of a payload
        that passed `check`)."""
        return codec(self.codec).nbytes(self.shape, self.torch_dtype)

    def check(self, model: ResolvedModel, num_tokens: int) -> None:
        """Refuses a payload that is not the KV of a prompt of `num_tokens` on `model` by what
        it says of itself, before any of its bytes are read."""
        if self.format != FORMAT:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload format {self.format}; this kvrelay reads {FORMAT}"
            )
        if self.fingerprint != model.fingerprint:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload is from model {self.fingerprint}, engine runs {model.fingerprint}"
            )
        expected = (model.layers, 2, num_tokens, model.kv_heads, model.head_dim)
        if self.shape != expected:
            raise PayloadMismatch(ErrorKind.kv_mismatch, f"KV payload shape {self.shape}, expected {expected}")
        if self.dtype != model.dtype:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload dtype {self.dtype}, engine cache is {model.dtype}"
            )
        if self.codec not in CODECS:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload codec {self.codec!r}; this kvrelay reads {', '.join(CODECS)}"
            )

    def verify(self, model: ResolvedModel, num_tokens: int) -> None:
        """Refuses a payload that is not whole and sound KV of a prompt of `num_tokens` on
        `model`, reading its bytes."""
        self.check(model, num_tokens)
        if self.data.size != self.nbytes:
            # Under a valid checksum too: the codec would read past the bytes or leave some unread.
            raise PayloadLost(
                ErrorKind.kv_corrupt, f"KV payload has {self.data.size} bytes; its shape and codec make {self.nbytes}"
            )
        if checksum(self.data) != self.checksum:
            raise PayloadLost(ErrorKind.kv_corrupt, "KV payload fails its checksum")

    def decode(self, model: ResolvedModel, num_tokens: int) -> torch.Tensor:
        """The KV for a prompt of `num_tokens` on `model`, in host memory, or why this payload
        is not it."""
        self.verify(model, num_tokens)
        return codec(self.codec).decode(as_tensor(self.data), self.shape, self.torch_dtype)

    def upload(self, copies: DeviceCopies | None) -> Upload:
        """Its KV on the way to an engine's cache (a verified payload)."""
        return Upload(self.data, self.shape, self.torch_dtype, codec(self.codec), copies)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def checksum(data: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(data)


def to_column(payloads: list[KVPayload | None]) -> pa.ChunkedArray:
    """Null for rows without a payload. One chunk per payload, so that its bytes are wrapped
    where they lie, never copied into one buffer; one chunk per run of rows without."""
    chunks = []
    for has, group in itertools.groupby(payloads, key=lambda p: p is not None):
        run = list(group)
        chunks += [_chunk(p) for p in run] if has else [pa.nulls(len(run), TYPE)]
    return pa.chunked_array(chunks, TYPE)


def _chunk(p: KVPayload) -> pa.StructArray:
    offsets = pa.py_buffer(np.array([0, p.data.nbytes], np.int64))
    fields = {
        "format": pa.array([p.format], pa.int16()),
        "fingerprint": pa.array([p.fingerprint], pa.string()),
        "dtype": pa.array([p.dtype], pa.string()),
        "codec": pa.array([p.codec], pa.string()),
        "shape": pa.array([list(p.shape)], pa.list_(pa.int32())),
        "checksum": pa.array([p.checksum], pa.uint64()),
        "data": pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(p.data)]),
        "file": pa.array([p.file], pa.string()),
    }
    return pa.StructArray.from_arrays(list(fields.values()), fields=list(TYPE))


def from_column(table: pa.Table) -> list["KVPayload | PayloadError | None"]:
    """Per row its payload, None where it has none, or why it cannot be read. Zero-copy: each
    payload's bytes are a view of the column's Arrow buffer."""
    payloads: list[KVPayload | PayloadError | None] = []
    for chunk in table.column(KV_PAYLOAD).chunks:
        try:
            fields = _fields(chunk)
        except PayloadMismatch as error:
            payloads.extend([error] * len(chunk))
            continue
        has_data = fields["data"].is_valid().to_pylist()
        data = _views(fields.pop("data"))
        meta = [dict(zip(fields, values)) for values in zip(*(f.to_pylist() for f in fields.values()))]
        for valid, row, view, has in zip(chunk.is_valid().to_pylist(), meta, data, has_data):
            payloads.append(_payload(row, view if has else None) if valid else None)
    return payloads


def _fields(chunk: pa.Array) -> dict[str, pa.Array]:
    """The struct's fields by name, in TYPE's types. A dataset written or edited by other tools
    (Spark writes `binary`, a rebuilt struct may order its fields differently, integers may be
    wider) holds the same values: those are read, since refusing them would fail every row of a
    good dataset. What cannot be read losslessly as TYPE fails every row of the column, saying so."""
    refused = PayloadMismatch(ErrorKind.kv_mismatch, f"KV payload column is {chunk.type}; kvrelay reads {TYPE}")
    if not pa.types.is_struct(chunk.type):
        raise refused
    children = dict(zip((f.name for f in chunk.type), chunk.flatten()))  # flatten applies the struct's own offset
    try:
        return {f.name: children[f.name].cast(f.type) for f in TYPE}  # a safe cast: no value changes
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise refused from None


def _payload(row: dict, data: np.ndarray | None) -> "KVPayload | PayloadError":
    missing = [name for name, value in {**row, "data": data}.items() if value is None and name not in OPTIONAL]
    if missing:
        return PayloadLost(ErrorKind.kv_corrupt, f"KV payload has no {', '.join(missing)}")
    if None in row["shape"]:
        return PayloadLost(ErrorKind.kv_corrupt, f"KV payload shape {row['shape']} has a null dimension")
    return KVPayload(**{**row, "shape": tuple(row["shape"]), "data": data})


def _views(array: pa.LargeBinaryArray) -> list[np.ndarray]:
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    buffer = np.frombuffer(array.buffers()[2] or b"", np.uint8)
    return [buffer[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]
