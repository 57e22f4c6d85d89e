"""Where a stage and the KV connector inside its engine meet. The engine runs in the stage's
own process, so a dict keyed by request is enough: the prefill stage takes what the connector
saved, the decode stage offers what the connector will load. A request names its entry by
`KEY` in `SamplingParams.extra_args["kv_transfer_params"]`."""
import time
from contextlib import contextmanager
from typing import Iterator

import torch

KEY = "kvrelay_key"

_saved: dict[str, torch.Tensor] = {}
_offered: dict[str, torch.Tensor] = {}
_seconds = 0.0


@contextmanager
def timed() -> Iterator[None]:
    """Counts the enclosed work as KV handoff (copies, encoding, transport)."""
    global _seconds
    started = time.perf_counter()
    try:
        yield
    finally:
        _seconds += time.perf_counter() - started


def take_seconds() -> float:
    """Handoff time counted since the last call."""
    global _seconds
    seconds, _seconds = _seconds, 0.0
    return seconds


def save(key: str, kv: torch.Tensor) -> None:
    _saved[key] = kv


def take_saved(key: str) -> torch.Tensor:
    return _saved.pop(key)


def offer(key: str, kv: torch.Tensor) -> None:
    """Make canonical KV [layers, 2, tokens, kv_heads, head_dim] available to the next request
    that names `key`."""
    _offered[key] = kv


def take_offered(key: str) -> torch.Tensor:
    return _offered.pop(key)


def withdraw(key: str) -> None:
    _offered.pop(key, None)
