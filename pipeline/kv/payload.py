"""The KV payload column: a request's prompt KV in canonical layout
[layers, 2, tokens, kv_heads, head_dim], in the cache dtype, with what is needed to check it
before use. Stored as Ray's variable-shaped tensor column (Arrow, no pickle); bfloat16, which
numpy lacks, travels as its raw 16-bit words."""
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from ray.data.extensions import ArrowVariableShapedTensorArray

from pipeline.model import ResolvedModel

KV = "kv_payload"
KV_DTYPE = "kv_dtype"
KV_FINGERPRINT = "kv_fingerprint"
COLUMNS = (KV, KV_DTYPE, KV_FINGERPRINT)

_NUMPY_UNSUPPORTED = {torch.bfloat16: torch.uint16}


class PayloadMismatch(ValueError):
    """The payload cannot be used by this engine; the message says why."""


@dataclass(frozen=True)
class KVPayload:
    kv: torch.Tensor
    fingerprint: str

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[2]

    def check(self, model: ResolvedModel, num_tokens: int) -> None:
        if self.fingerprint != model.fingerprint:
            raise PayloadMismatch(f"KV payload is from model {self.fingerprint}, engine runs {model.fingerprint}")
        expected = (model.layers, 2, num_tokens, model.kv_heads, model.head_dim)
        if tuple(self.kv.shape) != expected:
            raise PayloadMismatch(f"KV payload shape {tuple(self.kv.shape)}, expected {expected}")
        if self.kv.dtype != getattr(torch, model.dtype):
            raise PayloadMismatch(f"KV payload dtype {self.kv.dtype}, engine cache is {model.dtype}")


def to_columns(payloads: list[KVPayload | None], model: ResolvedModel) -> dict[str, pa.Array]:
    """Rows without a payload get an empty (zero-token) tensor and null metadata."""
    dtype = getattr(torch, model.dtype)
    empty = torch.empty(model.layers, 2, 0, model.kv_heads, model.head_dim, dtype=dtype)
    arrays = [_to_numpy(p.kv if p else empty) for p in payloads]
    return {
        KV: ArrowVariableShapedTensorArray.from_numpy(arrays),
        KV_DTYPE: pa.array([model.dtype if p else None for p in payloads], pa.string()),
        KV_FINGERPRINT: pa.array([p.fingerprint if p else None for p in payloads], pa.string()),
    }


def from_columns(table: pa.Table) -> list[KVPayload | None]:
    arrays = [a for chunk in table.column(KV).chunks for a in chunk.to_numpy()]
    dtypes = table.column(KV_DTYPE).to_pylist()
    prints = table.column(KV_FINGERPRINT).to_pylist()
    return [
        KVPayload(_from_numpy(a, d), f) if d is not None else None for a, d, f in zip(arrays, dtypes, prints)
    ]


def _to_numpy(kv: torch.Tensor) -> np.ndarray:
    storage = _NUMPY_UNSUPPORTED.get(kv.dtype)
    return (kv.view(storage) if storage else kv).contiguous().numpy()


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    target = getattr(torch, dtype)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(target) if target in _NUMPY_UNSUPPORTED else tensor
