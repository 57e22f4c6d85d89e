"""The job report: written beside _metrics.json through the output's filesystem, naming the
pool that held the job back, never read back as rows; the time series it is drawn from; and
the live progress bar."""

import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io.commit import commit_shard
from pipeline.io.storage import read_output
from pipeline.job import meter
from pipeline.job.meter import BatchPoint, BatchReport, StageTally
from pipeline.job.metrics import JobMetrics, WorkerMetrics
from pipeline.job.report import output_rate, write_plot, write_report
from pipeline.job.run import commit
from tests.test_output import SHARDS, claimed, ledger_of, rows, writer


def stage(busy: float, rows: int, input_tokens: int, output_tokens: int, workers: int = 1, size: int = 0) -> dict:
    totals = {"busy_seconds": busy, "rows": rows, "input_tokens": input_tokens, "output_tokens": output_tokens}
    per_worker = [{"worker": f"node{i}:10{i}", "node": f"node{i}", "batches": 2, **totals} for i in range(workers)]
    return {
        **totals,
        "kv_handoff_seconds": 0.0,
        "workers": workers,
        "size": size or workers,
        "worker_cores": [[0]] * workers,
        "per_worker": per_worker,
    }


METRICS = {
    "mode": "disaggregated",
    "phase": "generate",
    "model": "smollm2-135m",
    "rows_in": 8,
    "rows_out": 8,
    "rows_errored": 3,
    "errors": {"empty_prompt": 1, "kv_corrupt": 2},
    "input_tokens": 400,
    "output_tokens": 160,
    "shards": {"total": 2, "resumed": 0},
    "wall_seconds": 100.0,
    "output_tokens_per_second": 1.6,
    "stages": {
        "tokenize": stage(2.0, 8, 400, 0),
        "prefill": stage(60.0, 6, 400, 6, workers=2, size=1),  # one worker replaced: 60% busy
        "decode": stage(140.0, 5, 0, 154, workers=2),  # 70% busy per worker: the bottleneck
        "detokenize": stage(1.0, 8, 0, 160),
    },
    "kv_bytes_moved": 6 * 2**20,
    "kv_blocks_referenced": 40,
    "kv_blocks_stored": 4,
    "kv_blocks_fetched": 4,
    "kv_bytes_saved": 36 * 2**20,
    "kv_recomputed_rows": 2,
    "kv_bytes_per_prompt_token": 46_080.0,
    "preemptions": 0,
    "kv_handoff_seconds": 3.0,
    "kv_handoff_share_of_prefill": 0.05,
    "startup_seconds": 2.0,
    "processing_seconds": 93.0,
    "input_rows_decoded": 8,
    "late_duplicate_rows": 0,
    "driver_bytes_received": 900,
    "object_store_peak_bytes": 3 * 2**20,
    "nodes": {"node0": {"CPU": 2.0}, "node1": {"CPU": 2.0}},
}
TIMELINE = [
    BatchPoint("tokenize", 1.0, 1.0, 4, 200, 0),
    BatchPoint("tokenize", 2.0, 1.0, 4, 200, 0),
    BatchPoint("prefill", 30.0, 28.0, 3, 200, 3),
    BatchPoint("prefill", 61.0, 31.0, 3, 200, 3),
    BatchPoint("decode", 70.0, 40.0, 3, 0, 90),
    BatchPoint("decode", 95.0, 34.0, 2, 0, 64),
    BatchPoint("detokenize", 96.0, 1.0, 8, 0, 160),
]


@pytest.fixture
def written(tmp_path):
    out, _ = claimed(tmp_path / "out")
    commit_shard(out.url, out.part(0), SHARDS[0], writer(out)(rows(0, 1, 2)).column("path").to_pylist(), None)
    write_plot(str(tmp_path / "out" / "_report.png"), TIMELINE)
    write_report(out, JobMetrics.from_dict(METRICS), plotted=True)
    return tmp_path / "out"


def test_report_states_pools_bottleneck_errors_and_kv(written):
    report = (written / "_report.md").read_text()
    assert report.startswith("# kvrelay disaggregated generate run of smollm2-135m\n")
    assert "- rows: 8 in, 8 out, 3 with errors" in report
    assert "| prefill | 2 | 60.0 | 60% | 6 | 400 | 6 | 3 | 203 |" in report
    assert "| decode | 2 | 140.0 | 70% | 5 | 0 | 154 | 2 | 77 |" in report
    assert "Bottleneck: the decode pool, its workers busy 70% of the wall time." in report
    assert "| decode | node1:101 | 2 | 140.0 | 5 | 0 | 154 |" in report
    assert "- `kv_corrupt`: 2\n- `empty_prompt`: 1\n" in report
    assert "- KV moved: 6.0 MiB, 46080 B per prompt token" in report
    assert (
        "- shared prefixes: rows named 40 shared KV blocks, 4 stored, 4 fetched by decode workers; 36.0 MiB did not move"
    ) in report
    assert "- handoff: 3.0 s, 5.0% of the prefill pool's busy time" in report
    assert "- prefill recomputed by the decode pool: 2 rows" in report
    assert "![rows through each stage and output tokens/s over time](_report.png)" in report


def test_metrics_json_reads_back_as_the_metrics_written(tmp_path):
    """Written as a finished job writes it, read back typed: every field, nested ones included."""
    out, _ = claimed(tmp_path / "out")
    metrics = JobMetrics.from_dict(METRICS)
    out.finish(metrics.to_json())
    assert JobMetrics.read(str(tmp_path / "out")) == metrics
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_plot_is_a_png(written):
    png = (written / "_report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_files_are_not_read_as_rows(written):
    assert read_output(str(written)).column("text").to_pylist() == ["t0", "t1", "t2"]


def test_a_run_that_resumed_everything_has_no_pools_and_no_plot(tmp_path):
    out, _ = claimed(tmp_path / "out")
    resumed = {**METRICS, "stages": {}, "errors": {}, "kv_bytes_moved": 0, "kv_bytes_per_prompt_token": None}
    write_report(out, JobMetrics.from_dict(resumed), plotted=False)
    report = (tmp_path / "out" / "_report.md").read_text()
    assert "No pool ran: every shard was committed by an earlier run." in report
    assert "No row errors." in report and "KV moved" not in report and "_report.png" not in report
    assert not (tmp_path / "out" / "_report.png").exists()


def test_a_rerun_withdraws_the_old_report(written):
    claimed(written)
    assert not (written / "_report.md").exists() and not (written / "_report.png").exists()


def test_output_rate_spreads_each_batch_over_the_seconds_it_ran():
    # Two decode workers: 100 tokens over [0, 20] s (5/s) and 100 over [10, 20] s (10/s).
    timeline = [
        BatchPoint("decode", 20.0, 20.0, 1, 0, 100),
        BatchPoint("decode", 20.0, 10.0, 1, 0, 100),
        BatchPoint("detokenize", 20.0, 0.1, 2, 0, 200),
    ]
    times, rate, window = output_rate(timeline, points=41)
    assert window == 1.0 and times[-1] == 20.0
    np.testing.assert_allclose(rate[(times > 0) & (times <= 10)], 5.0)
    np.testing.assert_allclose(rate[times >= 11], 15.0)
    assert 5.0 < rate[times == 10.5][0] < 15.0  # the window straddles the second batch's start


def test_tally_keeps_one_point_per_batch_on_one_clock(monkeypatch):
    clock = iter([1000.0, 1002.5, 1004.0])
    monkeypatch.setattr(meter, "time", SimpleNamespace(time=lambda: next(clock)))
    tally = StageTally()
    tally.join("prefill", "w1", "n1", [0])
    tally.join("decode", "w2", "n2", [1])
    tally.record("prefill", "w1", 2.4567, 2.4567, BatchReport(rows=3, input_tokens=30, output_tokens=3, kv_bytes=900))
    tally.record("decode", "w2", 1.5, 1.5, BatchReport(rows=3, output_tokens=21))
    assert tally.timeline() == [("prefill", 2.5, 2.457, 3, 30, 3), ("decode", 4.0, 1.5, 3, 0, 21)]
    assert tally.stages()["prefill"].work.kv_bytes == 900  # the totals are kept as before


def test_overlapping_batches_count_their_common_time_once(monkeypatch):
    """An engine worker holds several batches: from 0 to 10 s and from 4 to 12 s is 12 s busy,
    not 18; each batch keeps its own duration on the timeline."""
    clock = iter([0.0, 10.0, 12.0, 20.0, 21.0])  # the second start, at 4 s, reads no clock
    monkeypatch.setattr(meter, "time", SimpleNamespace(perf_counter=lambda: next(clock), time=lambda: 0.0))
    busy = meter.BusyClock()
    busy.start()
    busy.start()
    shares = [busy.stop(), busy.stop()]
    busy.start()  # idle from 12 to 20 s
    shares.append(busy.stop())
    assert shares == [10.0, 2.0, 1.0]
    tally = StageTally()
    tally.join("colocated", "w", "n", [0])
    tally.record("colocated", "w", 10.0, 10.0, BatchReport(rows=2))
    tally.record("colocated", "w", 8.0, 2.0, BatchReport(rows=2))
    assert tally.stages()["colocated"].busy_seconds == 12.0
    assert [p.seconds for p in tally.timeline()] == [10.0, 8.0]


def test_tally_keeps_each_workers_node_and_share():
    tally = StageTally()
    tally.join("decode", "a:1", "a" * 56, [0])
    tally.join("decode", "b:2", "b" * 56, [1])
    tally.join("decode", "b:3", "b" * 56, [1])  # never got a batch
    for worker, n in (("a:1", 3), ("b:2", 2), ("a:1", 1)):
        tally.record("decode", worker, 0.5, 0.5, BatchReport(rows=n, input_tokens=10 * n, output_tokens=n))
    decode = tally.stages()["decode"]
    assert decode.worker_cores == [[0], [1], [1]]
    assert list(decode.workers.values()) == [
        WorkerMetrics(
            worker="a:1", node="a" * 56, busy_seconds=1.0, batches=2, rows=4, input_tokens=40, output_tokens=4
        ),
        WorkerMetrics(
            worker="b:2", node="b" * 56, busy_seconds=0.5, batches=1, rows=2, input_tokens=20, output_tokens=2
        ),
        WorkerMetrics(worker="b:3", node="b" * 56, busy_seconds=0, batches=0, rows=0, input_tokens=0, output_tokens=0),
    ]
    assert decode.work.rows == sum(w.rows for w in decode.workers.values()) == 6


class Batches:
    """Stands in for the Ray dataset: the write stage's fragment rows its iter_batches yields."""

    def __init__(self, *batches: pa.Table):
        self.batches = batches

    def iter_batches(self, **_):
        return iter(self.batches)


def test_progress_bar_shows_rows_committed_and_output_tokens_per_second(tmp_path, capsys, ray_cluster):
    out, _ = claimed(tmp_path / "out")
    write = writer(out)
    commit(Batches(write(rows(0, 1, 2)), write(rows(3, 4))), ledger_of(out), 5)
    assert re.search(r"committed: 100%.* 5/5 .*, [\d.]+ output tok/s\]", capsys.readouterr().err)
