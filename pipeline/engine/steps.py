"""Engine step times and inter-token times, as distributions: what shows how much prefill work
stalls decode in a colocated engine and how flat decode runs on a pool of its own.

The loop (pipeline/engine/loop.py) times each `step()`; the time between a request's tokens is
read from the engine core's outputs (`watch_tokens`). Both go into log-spaced histograms, whose
memory stays the same however long the job runs and which add up across batches and workers."""

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

BINS_PER_DECADE = 40  # bins 6% wide: a percentile within 3% of the exact one


@dataclass
class Histogram:
    """Seconds, counted in log-spaced bins; exact count, mean, standard deviation and maximum."""

    bins: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0
    squares: float = 0.0
    largest: float = 0.0

    def add(self, seconds: float) -> None:
        key = math.floor(math.log10(max(seconds, 1e-9)) * BINS_PER_DECADE)
        self.bins[key] = self.bins.get(key, 0) + 1
        self.count += 1
        self.total += seconds
        self.squares += seconds * seconds
        self.largest = max(self.largest, seconds)

    def __add__(self, other: "Histogram") -> "Histogram":
        bins = dict(self.bins)
        for key, n in other.bins.items():
            bins[key] = bins.get(key, 0) + n
        return Histogram(
            bins=bins,
            count=self.count + other.count,
            total=self.total + other.total,
            squares=self.squares + other.squares,
            largest=max(self.largest, other.largest),
        )

    def quantile(self, q: float) -> float:
        """The bin holding the q-quantile, at its geometric middle (the maximum where that is less)."""
        rank, seen = q * self.count, 0
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen >= rank:
                return min(10 ** ((key + 0.5) / BINS_PER_DECADE), self.largest)
        return self.largest

    def spread(self) -> Optional["Spread"]:
        if not self.count:
            return None
        mean = self.total / self.count
        variance = max(self.squares / self.count - mean * mean, 0.0)
        return Spread(
            count=self.count,
            mean=mean,
            stddev=math.sqrt(variance),
            p50=self.quantile(0.5),
            p90=self.quantile(0.9),
            p99=self.quantile(0.99),
            max=self.largest,
        )


@dataclass
class Spread:
    """A distribution of seconds, summarised: what _metrics.json and the report show."""

    count: int
    mean: float
    stddev: float
    p50: float
    p90: float
    p99: float
    max: float


@dataclass
class StepTimes:
    """What one engine's steps took since the last `take`: steps, their durations, and the gaps
    between a request's successive tokens. Written by the thread that steps the engine, taken
    by the stage when it reports a batch."""

    steps: int = 0
    step_seconds: Histogram = field(default_factory=Histogram)
    inter_token_seconds: Histogram = field(default_factory=Histogram)


class StepClock:
    """Keeps an engine's StepTimes across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times = StepTimes()
        self._last_token: dict[str, float] = {}  # by request id, until it finishes

    def step(self, seconds: float) -> None:
        with self._lock:
            self._times.steps += 1
            self._times.step_seconds.add(seconds)

    def tokens(self, outputs: list[Any]) -> None:
        """One step's engine-core outputs: each request with new tokens, a gap since its last
        token (a request's first token starts its clock: that gap is its time to first token,
        not an inter-token time). An aborted request's last time stays: the engine core names
        requests by ids of its own, and aborts are rare (a cancelled batch)."""
        now = time.perf_counter()
        with self._lock:
            for output in outputs:
                if not output.new_token_ids:
                    continue
                last = self._last_token.get(output.request_id)
                if last is not None:
                    self._times.inter_token_seconds.add(now - last)
                if output.finish_reason is None:
                    self._last_token[output.request_id] = now
                else:
                    self._last_token.pop(output.request_id, None)

    def take(self) -> StepTimes:
        """What was recorded since the last take."""
        with self._lock:
            times, self._times = self._times, StepTimes()
        return times


def watch_tokens(engine: Any, clock: StepClock) -> None:
    """Has `clock` see every step's engine-core outputs of a vLLM `LLMEngine` running in this
    process. NOTE: requests finish with one output (RequestOutputKind.FINAL_ONLY, which keeps
    the step cheap), so the engine's own outputs do not show each token; vLLM's per-token
    statistics need log_stats, which also starts its Prometheus and logging stat loggers."""
    core = engine.engine_core
    get_output = core.get_output

    def get_output_and_watch() -> Any:
        outputs = get_output()
        clock.tokens(outputs.outputs)
        return outputs

    core.get_output = get_output_and_watch
