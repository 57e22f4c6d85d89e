"""Where a stage and the KV connector inside its engine meet. The engine runs in the stage's
own process, so a dict keyed by request is enough: the prefill stage takes what the connector
saved, the decode stage offers what the connector will load. A request names its entry by
`KEY` in `SamplingParams.extra_args["kv_transfer_params"]`.

The stage and the engine run in different threads (pipeline/engine_loop.py), and the stage works
on several batches at once: keys are unique per request, and the handoff time is one count per
process (one engine) that each batch's report takes as it stands when the batch ends."""
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch

KEY = "kvrelay_key"

_saved: dict[str, torch.Tensor] = {}
_offered: dict[str, torch.Tensor] = {}
_seconds = 0.0
_seconds_lock = threading.Lock()  # counted from the engine's thread and the stage's


@contextmanager
def timed() -> Iterator[None]:
    """Counts the enclosed work as KV handoff (copies, encoding, transport)."""
    global _seconds
    started = time.perf_counter()
    try:
        yield
    finally:
        with _seconds_lock:
            _seconds += time.perf_counter() - started


def take_seconds() -> float:
    """Handoff time counted since the last call: with batches overlapping, some of it was
    another batch's, but over the stage's batches it adds up to the stage's handoff time."""
    global _seconds
    with _seconds_lock:
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
