"""Where a stage and the KV connector inside its engine meet. The engine runs in the stage's
own process, so a dict keyed by request is enough: the prefill stage takes what the connector
saved, the decode stage offers what the connector will load: encoded KV on its way between the
engine's device and host memory (pipeline/kv/transfer.py). A request names its entry by `KEY`
in `SamplingParams.extra_args["kv_transfer_params"]`.

The stage and the engine run in different threads (pipeline/engine/loop.py), and the stage works
on several batches at once: keys are unique per request, and the counts below are one per
process (one engine) that each batch's report takes as they stand when the batch ends."""

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from pipeline.kv.transfer import DeviceCopies, Download, Upload

KEY = "kvrelay_key"
SAVE_FROM = "kvrelay_save_from"  # a prefill request's first token to save: the blocks before are stored already

_saved: dict[str, Download] = {}
_offered: dict[str, Upload] = {}
copies: DeviceCopies | None = None  # the engine's, set by its connector on a CUDA engine


class Tally:
    """A count added to from the engine's thread and the stage's, taken by each batch as it
    ends: with batches overlapping, some of it was another batch's, but over the stage's
    batches it adds up to the stage's."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        with self._lock:
            self._value += amount

    def take(self) -> float:
        with self._lock:
            value, self._value = self._value, 0
        return value


seconds = Tally()  # KV handoff: copies, encoding, transport
preemptions = Tally()  # of this engine's requests, counted as each request finishes


@contextmanager
def timed() -> Iterator[None]:
    """Counts the enclosed work as KV handoff."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds.add(time.perf_counter() - started)


def save(key: str, kv: Download) -> None:
    _saved[key] = kv


def take_saved(key: str) -> Download:
    return _saved.pop(key)


def offer(key: str, kv: Upload) -> None:
    """Make a request's KV available to the request that names `key`, until it is withdrawn."""
    _offered[key] = kv


def offered(key: str) -> Upload:
    """Kept, not taken: a request the engine preempts (its cache ran short) loses its blocks and
    loads its KV again when it resumes."""
    return _offered[key]


def withdraw(key: str) -> None:
    """Once the request has left the engine."""
    kv = _offered.pop(key, None)
    if kv is not None:
        kv.release()
