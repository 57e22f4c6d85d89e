"""What a job uses of the machine while it runs, sampled in a background thread: the object
store's peak (in every job's metrics), and for the bench the process tree's peak RSS and CPU
seconds."""

import threading
import time
from typing import Callable

import psutil
import ray


class PeakSampler:
    """The largest sample taken while the `with` block ran, twice a second, in a background
    thread (the job's own threads keep running); a subclass says how to take one. `cpu_seconds`
    is what the sampling itself cost, so a measurement of the process can leave it out."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak = 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def measurer(self) -> Callable[[], int]:
        """Called once, in the sampling thread: the function that takes one sample."""
        raise NotImplementedError

    def _sample(self) -> None:
        measure = self.measurer()
        while True:
            self.peak = max(self.peak, measure())
            self.cpu_seconds = time.thread_time()
            if self._stop.wait(self.interval):
                return


class ObjectStorePeak(PeakSampler):
    """The most object-store memory the cluster held while the job ran (the figure
    `ray memory --stats-only` prints; Ray has no public call for it). One connection to a
    raylet for every sample: a new one each time cost the driver 8 ms of CPU a sample."""

    def measurer(self) -> Callable[[], int]:
        from ray._common.network_utils import build_address
        from ray._private.grpc_utils import init_grpc_channel
        from ray._private.internal_api import get_state_from_address
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        raylet = next(node for node in state.node_table() if node["Alive"])  # it asks every node
        channel = init_grpc_channel(build_address(raylet["NodeManagerAddress"], raylet["NodeManagerPort"]))
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        request = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)
        return lambda: stub.FormatGlobalMemoryInfo(request, timeout=60).store_stats.object_store_bytes_used


class ProcessTreeRSSPeak(PeakSampler):
    """The most resident memory this process and all its descendants held at once: with Ray
    started in-process, its raylet and so every worker are descendants. RSS counts a shared
    page (shared libraries, the object store's shared memory) once in each process that maps
    it, so the sum is an upper bound."""

    def measurer(self) -> Callable[[], int]:
        root = psutil.Process()
        return lambda: tree_rss(root)


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of `root` and its descendants, summed."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # it ended between listing and reading
            pass
    return total


class ProcessTreeCPU(PeakSampler):
    """CPU seconds (user and system) this process and all its descendants used while the `with`
    block ran, counting each process as last seen (a worker that ended keeps its last sample),
    in milliseconds. The driver's own share is `time.process_time()` over the same span, less
    this sampler's `cpu_seconds` (it walks every process on the machine twice a second)."""

    def measurer(self) -> Callable[[], int]:
        root, seen = psutil.Process(), {}

        def measure() -> int:
            for process in [root, *root.children(recursive=True)]:
                try:
                    times = process.cpu_times()
                    seen[process.pid] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            return int(1000 * sum(seen.values()))

        before = measure()
        return lambda: measure() - before
