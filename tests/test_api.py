"""pipeline.api on a Dataset of the caller's: rows are numbered once each, whatever Ray does to
the worker that numbers them (the stages themselves: tests/test_workloads.py)."""

import threading
import time

import psutil
import pyarrow as pa
import ray
import ray.data

from pipeline.api import numbered
from pipeline.columns import ROW

ROWS = 40


def _slowly(batch: pa.Table) -> pa.Table:
    time.sleep(0.2)
    return batch


def test_a_restarted_numbering_worker_goes_on_where_it_stopped(ray_cluster):
    """SIGKILL the numbering worker once it has numbered a few batches: Ray restarts it and
    redoes its batch, and no number is given twice (ids and per-row seeds come from them)."""
    before = set(_counters())
    prompts = ray.data.range(ROWS, override_num_blocks=ROWS // 2).map_batches(_slowly, batch_format="pyarrow")
    ds = numbered(prompts, "row_id")
    killed = threading.Event()
    threading.Thread(target=_kill_after_some_rows, args=(before, killed), daemon=True).start()
    rows = ds.take_all()
    assert killed.is_set()
    assert sorted(r["id"] for r in rows) == list(range(ROWS))  # every row once
    numbers = [r[ROW] for r in rows]
    assert len(set(numbers)) == ROWS and [r["row_id"] for r in rows] == numbers  # each number once


def _counters() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("kvrelay-rows")]


def _kill_after_some_rows(before: set[str], killed: threading.Event) -> None:
    while not (started := set(_counters()) - before):
        time.sleep(0.05)
    counter = ray.get_actor(started.pop())
    while ray.get(counter.take.remote(0)) < 8:
        time.sleep(0.05)
    for process in psutil.process_iter(["cmdline"]):
        if "MapBatches(Numbered)" in " ".join(process.info["cmdline"] or ()):
            process.kill()
            killed.set()
