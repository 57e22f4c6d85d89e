"""The KV payload: one request's prompt KV as it travels from prefill to decode, in one Arrow
struct column that round-trips through Ray's object store and Parquet without pickle.

The KV in canonical layout [layers, parts (K, V), tokens, kv_heads, head_dim], encoded by
a codec (pipeline.kv.codec) block by block (`block_tokens` tokens each; 0: one block), plus what
decode needs to refuse a payload it must not use: the model fingerprint, cache dtype, codec,
shape and an XXH3-64 checksum of the encoded bytes and their block size (a hash ~7x faster than
CRC32 here, and the check runs over every byte on both sides). The first `len(blocks)` blocks
may be shared with other prompts: then the payload names them (their content hash and checksum;
pipeline.kv.blocks) and carries only the blocks after them. The carried bytes are inline, or in
a file named by `file` (pipeline.kv.store).

Format 6 binds the KV to what it was computed under besides its tokens (`conditioning`: the LoRA
adapter's digest, pipeline/engine/lora.py, then `+images:` and the row's images' digest,
pipeline/io/images.py; empty for neither): a decode engine refuses it for a row of another
adapter or other images. Format 5 says what cache it carries (pipeline/engine/family.py): the `family`, the
first token carried (a sliding window's), and the bytes of recurrent layers' state that follow
the KV in `data`; an MLA latent is canonical KV of one part and one head. Formats 3 and 4, still
read, carry attention KV from token 0; format 4 names shared blocks by SHA-256 (32 bytes),
format 3 by XXH3-128 (16)."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import xxhash

from pipeline.columns import KV_PAYLOAD, ErrorKind, row_error
from pipeline.engine.family import Family
from pipeline.engine.model import ResolvedModel
from pipeline.kv.codec import CODECS, Codec, codec
from pipeline.kv.transfer import DeviceCopies, Upload

FORMAT = 6
# The formats this kvrelay reads, and the length of the block hashes of each.
HASH_BYTES = {3: 16, 4: 32, 5: 32, 6: 32}
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
        ("block_tokens", pa.int32()),
        ("blocks", pa.list_(pa.binary())),
        ("block_checksums", pa.list_(pa.uint64())),
        ("family", pa.string()),
        ("first_token", pa.int32()),
        ("state_bytes", pa.int64()),
        ("conditioning", pa.string()),
    ]
)
OPTIONAL = ("file",)  # every other field of a payload must be set
# Fields later formats added: the format that added each, and what a payload of an earlier
# format means by its absence.
ADDED = {
    "family": (5, Family.attention.value),
    "first_token": (5, 0),
    "state_bytes": (5, 0),
    "conditioning": (6, ""),
}


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
    block_tokens: int = 0
    blocks: tuple[bytes, ...] = ()  # the shared blocks' content hashes, from the first
    block_checksums: tuple[int, ...] = ()
    family: str = Family.attention.value
    first_token: int = 0  # of the prompt: the KV before it is not carried (outside a window)
    state_bytes: int = 0  # at the end of `data`: recurrent layers' state
    conditioning: str = ""  # what it was computed under: a LoRA adapter's digest (+images: theirs); empty: neither

    @classmethod
    def of(
        cls,
        data: np.ndarray,
        shape: tuple[int, ...],
        model: ResolvedModel,
        codec_name: str,
        block_tokens: int = 0,
        blocks: tuple[bytes, ...] = (),
        block_checksums: tuple[int, ...] = (),
        first_token: int = 0,
        conditioning: str = "",
    ) -> "KVPayload":
        """The payload of KV of `shape` from `first_token` on that `codec_name` encoded as
        `data`, per block of `block_tokens` (all of it, or the blocks after the shared `blocks`
        it names), with `model`'s recurrent state after it, if it has any; computed under the
        LoRA adapter of digest `conditioning`, if any."""
        return cls(
            model.fingerprint,
            model.dtype,
            codec_name,
            shape,
            checksum(data, block_tokens),
            data,
            block_tokens=block_tokens,
            blocks=tuple(blocks),
            block_checksums=tuple(block_checksums),
            family=model.cache.family.value,
            first_token=first_token,
            state_bytes=model.cache.state_bytes,
            conditioning=conditioning,
        )

    @classmethod
    def encode(
        cls,
        kv: torch.Tensor,
        model: ResolvedModel,
        codec_name: str,
        block_tokens: int = 0,
        *,
        first_token: int = 0,
        state: np.ndarray | None = None,
        conditioning: str = "",
    ) -> "KVPayload":
        data = codec(codec_name, block_tokens).encode(kv).cpu().numpy()
        if state is not None:
            data = np.concatenate([data, state])
        return cls.of(
            data, tuple(kv.shape), model, codec_name, block_tokens, first_token=first_token, conditioning=conditioning
        )

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def folder(self) -> str | None:
        """The job folder its file is in (kv.transport=storage), where its shared blocks are."""
        return self.file.split("/")[0] if self.file else None

    @property
    def shared_tokens(self) -> int:
        return len(self.blocks) * self.block_tokens

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one whole block."""
        return (*self.shape[:2], self.block_tokens, *self.shape[3:])

    @property
    def own_shape(self) -> tuple[int, ...]:
        """The shape of the KV it carries: its tokens after the shared blocks."""
        return (*self.shape[:2], self.num_tokens - self.shared_tokens, *self.shape[3:])

    @property
    def nbytes(self) -> int:
        """The size of the encoded bytes it carries that its codec, shape and dtype make (of
        a payload that passed `check`)."""
        return self.blocked_codec.nbytes(self.own_shape, self.torch_dtype) + self.state_bytes

    @property
    def block_nbytes(self) -> int:
        """The encoded size of one shared block."""
        return codec(self.codec).nbytes(self.block_shape, self.torch_dtype)

    @property
    def blocked_codec(self) -> Codec:
        return codec(self.codec, self.block_tokens)

    def check(self, model: ResolvedModel, num_tokens: int, conditioning: str = "") -> None:
        """Refuses a payload that is not the KV of a prompt of `num_tokens` on `model` under
        the LoRA adapter of digest `conditioning` (empty: none) by what it says of itself, before any
        of its bytes are read."""
        if self.format not in HASH_BYTES:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch,
                f"KV payload format {self.format}; this kvrelay reads {', '.join(map(str, HASH_BYTES))}",
            )
        if self.fingerprint != model.fingerprint:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload is from model {self.fingerprint}, engine runs {model.fingerprint}"
            )
        if self.conditioning != conditioning:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch,
                f"KV payload was computed under {_adapter(self.conditioning)}, the row runs under {_adapter(conditioning)}",
            )
        cache = model.cache
        if self.family != cache.family.value:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch,
                f"KV payload holds a {self.family}-family cache; the engine's is {cache.family.value}",
            )
        first, stop = cache.carried(num_tokens)
        expected = cache.token_shape(stop - first)
        if self.shape != expected or self.first_token != first:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch,
                f"KV payload shape {self.shape} from token {self.first_token}, expected {expected} from {first}",
            )
        if self.state_bytes != cache.state_bytes:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch,
                f"KV payload carries {self.state_bytes} bytes of state, the engine keeps {cache.state_bytes}",
            )
        if self.dtype != model.dtype:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload dtype {self.dtype}, engine cache is {model.dtype}"
            )
        if self.codec not in CODECS:
            raise PayloadMismatch(
                ErrorKind.kv_mismatch, f"KV payload codec {self.codec!r}; this kvrelay reads {', '.join(CODECS)}"
            )
        if (
            self.block_tokens < 0
            or (self.blocks and not self.block_tokens)
            or (self.shared_tokens and self.shared_tokens >= stop)
        ):
            raise PayloadMismatch(
                ErrorKind.kv_mismatch,
                f"KV payload names {len(self.blocks)} shared blocks of {self.block_tokens} tokens for a prompt "
                f"of {num_tokens}",
            )
        if len(self.block_checksums) != len(self.blocks) or any(len(h) != HASH_BYTES[self.format] for h in self.blocks):
            raise PayloadLost(ErrorKind.kv_corrupt, "KV payload's shared blocks and their checksums do not match")

    def verify(self, model: ResolvedModel, num_tokens: int, conditioning: str = "") -> None:
        """Refuses a payload that is not whole and sound KV of a prompt of `num_tokens` on
        `model` under adapter `conditioning`, reading its bytes."""
        self.check(model, num_tokens, conditioning)
        if self.data.size != self.nbytes:
            # Under a valid checksum too: the codec would read past the bytes or leave some unread.
            raise PayloadLost(
                ErrorKind.kv_corrupt, f"KV payload has {self.data.size} bytes; its shape and codec make {self.nbytes}"
            )
        if checksum(self.data, self.block_tokens) != self.checksum:
            raise PayloadLost(ErrorKind.kv_corrupt, "KV payload fails its checksum")

    def decode(
        self, model: ResolvedModel, num_tokens: int, shared: Sequence[np.ndarray] = (), conditioning: str = ""
    ) -> torch.Tensor:
        """The KV for a prompt of `num_tokens` on `model` under adapter `conditioning`, in host memory,
        or why this payload is not it; `shared`: the bytes of its shared blocks, checked
        (`check_shared`)."""
        self.verify(model, num_tokens, conditioning)
        return self.upload(None, shared).to_device(0)[0]

    def check_shared(self, shared: Sequence[np.ndarray]) -> None:
        """Refuses shared blocks of another size than its own make. Their bytes are checked
        against `block_checksums` once per worker, as they are fetched (pipeline/kv/blocks.py
        BlockCache), not for every row that names them."""
        for h, data in zip(self.blocks, shared, strict=True):
            if data.size != self.block_nbytes:
                raise PayloadLost(
                    ErrorKind.kv_corrupt, f"KV block {h.hex()} has {data.size} bytes, not {self.block_nbytes}"
                )

    def upload(self, copies: DeviceCopies | None, shared: Sequence[np.ndarray] = ()) -> Upload:
        """Its KV on the way to an engine's cache (a verified payload, its shared blocks'
        verified bytes in order)."""
        own = self.data.size - self.state_bytes
        pieces = [(data, self.block_shape) for data in shared] + [(self.data[:own], self.own_shape)]
        state = self.data[own:] if self.state_bytes else None
        return Upload(pieces, self.torch_dtype, self.blocked_codec, copies, first=self.first_token, state=state)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _adapter(conditioning: str) -> str:
    """What a KV's conditioning says: `<adapter digest>[+images:<digest>]` (pipeline/stages/engine_stage.py)."""
    adapter, _, images = conditioning.partition("+images:")
    said = f"LoRA adapter {adapter}" if adapter else "no LoRA adapter"
    return f"{said} with images {images}" if images else said


def checksum(data: np.ndarray, block_tokens: int = 0) -> int:
    """Of the bytes and the blocks they are cut in: the same bytes read in other blocks are
    other KV."""
    return xxhash.xxh3_64_intdigest(data, seed=block_tokens)


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
        "block_tokens": pa.array([p.block_tokens], pa.int32()),
        "blocks": pa.array([list(p.blocks)], TYPE.field("blocks").type),
        "block_checksums": pa.array([list(p.block_checksums)], TYPE.field("block_checksums").type),
        "family": pa.array([p.family], pa.string()),
        "first_token": pa.array([p.first_token], pa.int32()),
        "state_bytes": pa.array([p.state_bytes], pa.int64()),
        "conditioning": pa.array([p.conditioning], pa.string()),
    }
    return pa.StructArray.from_arrays(list(fields.values()), fields=list(TYPE))


def from_column(table: pa.Table) -> list["KVPayload | PayloadError | None"]:
    """Per row its payload, None where it has none, or why it cannot be read. Zero-copy: each
    payload's bytes are a view of the column's Arrow buffer."""
    payloads: list[KVPayload | PayloadError | None] = []
    for chunk in table.column(KV_PAYLOAD).chunks:
        try:
            payloads += _read(chunk)
        except PayloadMismatch:  # a value that does not fit kvrelay's types fails its own row alone
            payloads += [_read_row(chunk.slice(i, 1)) for i in range(len(chunk))]
    return payloads


def _read_row(row: pa.Array) -> "KVPayload | PayloadError | None":
    try:
        return _read(row)[0]
    except PayloadMismatch as error:
        return error


def _read(chunk: pa.Array) -> list["KVPayload | PayloadError | None"]:
    fields = _fields(chunk)
    has_data = fields["data"].is_valid().to_pylist()
    data = _views(fields.pop("data"))
    try:
        meta = [dict(zip(fields, values)) for values in zip(*(f.to_pylist() for f in fields.values()))]
    except UnicodeDecodeError:
        raise PayloadMismatch(ErrorKind.kv_mismatch, "KV payload holds text that is not valid UTF-8") from None
    return [
        _payload(row, view if has else None) if valid else None
        for valid, row, view, has in zip(chunk.is_valid().to_pylist(), meta, data, has_data)
    ]


def _fields(chunk: pa.Array) -> dict[str, pa.Array]:
    """The struct's fields by name, in TYPE's types. A dataset written or edited by other tools
    (Spark writes `binary`, a rebuilt struct may order its fields differently, integers may be
    wider) holds the same values: those are read, since refusing them would fail every row of a
    good dataset. What cannot be read losslessly as TYPE is refused, saying so."""
    refused = PayloadMismatch(ErrorKind.kv_mismatch, f"KV payload column is {chunk.type}; kvrelay reads {TYPE}")
    if not pa.types.is_struct(chunk.type):
        raise refused
    children = dict(zip((f.name for f in chunk.type), chunk.flatten()))  # flatten applies the struct's own offset
    for name in ADDED.keys() - children.keys():  # a payload of an earlier format
        children[name] = pa.nulls(len(chunk), TYPE.field(name).type)
    try:
        return {f.name: children[f.name].cast(f.type) for f in TYPE}  # a safe cast: no value changes
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise refused from None


def _payload(row: dict, data: np.ndarray | None) -> "KVPayload | PayloadError":
    if isinstance(row["format"], int):
        row = {**row, **{k: value for k, (since, value) in ADDED.items() if row[k] is None and row["format"] < since}}
    missing = [name for name, value in {**row, "data": data}.items() if value is None and name not in OPTIONAL]
    if missing:
        return PayloadLost(ErrorKind.kv_corrupt, f"KV payload has no {', '.join(missing)}")
    if None in row["shape"]:
        return PayloadLost(ErrorKind.kv_corrupt, f"KV payload shape {row['shape']} has a null dimension")
    if None in row["blocks"] or None in row["block_checksums"]:
        return PayloadLost(ErrorKind.kv_corrupt, "KV payload names a shared block that is null")
    shape, blocks, sums = (tuple(row[name]) for name in ("shape", "blocks", "block_checksums"))
    return KVPayload(**{**row, "shape": shape, "blocks": blocks, "block_checksums": sums, "data": data})


def _views(array: pa.LargeBinaryArray) -> list[np.ndarray]:
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    buffer = np.frombuffer(array.buffers()[2] or b"", np.uint8)
    return [buffer[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]
