"""jobs.bench's figures without running a model: pool rates, the processing window, efficiency,
the table and plot, a sweep's combined table, the memory sampler on real processes, and the
bench config as Hydra composes it."""

import json
import os
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from pipeline.bench.config import BenchMode, SharedPrefixSettings
from pipeline.bench.results import (
    BENCH_JSON,
    SweepTable,
    bench_rows,
    combine,
    fastest,
    markdown,
    mode_row,
    write,
)
from pipeline.bench.shared_prefix import write_workload
from pipeline.bench.throughput import later_job_of_sweep, modes
from pipeline.errors import JobError
from pipeline.job.meter import BatchPoint, processing_window
from pipeline.job.metrics import JobMetrics
from pipeline.job.run import _window
from pipeline.job.usage import ProcessTreeRSSPeak, tree_rss
from pipeline.plan.roofline import load_bench
from pipeline.stages.tokenize import PromptEncoder, prompt_values
from tests.conftest import CONF, job_config
from tests.test_job_report import METRICS, stage

GIB = 2**30


def pool(busy: float, rows: int, input_tokens: int, output_tokens: int, size: int = 1, workers: int | None = None):
    """A stage of _metrics.json: `workers` that joined it, `size` of them at once."""
    return {**stage(busy, rows, input_tokens, output_tokens, workers or size), "size": size}


def utilisation(compute: float, bandwidth: float) -> dict:
    """A pool's utilisation in _metrics.json, on a device of 100 TFLOP/s and 1 TB/s."""
    flops, traffic = compute * 1e14, bandwidth * 1e12
    return {
        "device": "gpu",
        "flops_per_s": flops,
        "bytes_per_s": traffic,
        "intensity": flops / traffic,
        "peak_flops_per_s": 1e14,
        "peak_bytes_per_s": 1e12,
        "compute_share": compute,
        "bandwidth_share": bandwidth,
    }


def spread(p50: float, p99: float, stddev: float) -> dict:
    return {"count": 100, "mean": p50, "stddev": stddev, "p50": p50, "p90": p50, "p99": p99, "max": p99}


PLAIN = {"wall_seconds": 50.0, "generate_seconds": 40.0, "rows": 10, "output_tokens": 300, "peak_rss_bytes": 4 * GIB}
DISAGGREGATED = {
    **METRICS,
    "mode": "disaggregated",
    "rows_in": 11,
    "rows_out": 11,
    "rows_errored": 1,
    "input_tokens": 2000,
    "output_tokens": 300,
    "wall_seconds": 100.0,
    "startup_seconds": 20.0,
    "processing_seconds": 70.0,
    "stages": {
        "tokenize": pool(0.5, 11, 2000, 0),
        # 0.2 rows/s, 40 prompt tokens/s: the slower pool
        "prefill": {**pool(50.0, 10, 2000, 10), "utilisation": utilisation(compute=0.8, bandwidth=0.05)},
        # 40 s per worker: 0.25 rows/s, 7.25 output tokens/s
        "decode": {
            **pool(80.0, 10, 0, 290, size=2),
            "utilisation": utilisation(compute=0.1, bandwidth=0.6),
            "step_seconds": spread(0.02, p99=0.05, stddev=0.004),
            "inter_token_seconds": spread(0.021, p99=0.06, stddev=0.005),
        },
        "detokenize": pool(0.2, 11, 0, 300),
    },
    "kv_bytes_per_prompt_token": 46080.0,
    "kv_handoff_share_of_prefill": 0.07,
    "object_store_peak_bytes": 300 * 2**20,
    "peak_rss_bytes": 6 * GIB,
}
COLOCATED = {
    **DISAGGREGATED,
    "mode": "colocated",
    "wall_seconds": 80.0,
    "startup_seconds": 10.0,
    "processing_seconds": 65.0,
    "stages": {"colocated": pool(60.0, 10, 2000, 300)},
    "kv_bytes_per_prompt_token": None,
    "kv_handoff_share_of_prefill": None,
    "peak_rss_bytes": 5 * GIB,
}
RESULTS = {"plain": PLAIN, "colocated": COLOCATED, "disaggregated": DISAGGREGATED}


def test_a_pool_rate_is_its_work_over_one_workers_mean_busy_time():
    assert JobMetrics.from_dict(DISAGGREGATED).stages["decode"].rates() == {
        "rows_per_s": 0.25,
        "prompt_tokens_per_s": 0.0,
        "output_tokens_per_s": 7.25,
    }
    # A worker that died (OOM) and its replacement: two workers joined, one ran at a time.
    replaced = {**DISAGGREGATED, "stages": {"decode": pool(40.0, 10, 0, 290, size=1, workers=2)}}
    assert JobMetrics.from_dict(replaced).stages["decode"].rates()["rows_per_s"] == 0.25


def test_disaggregated_row_rates_efficiency_and_memory():
    row = mode_row("disaggregated", DISAGGREGATED, PLAIN)
    assert row == {
        "mode": "disaggregated",
        "pools": "1 prefill + 2 decode",
        "wall_seconds": 100.0,
        "startup_seconds": 20.0,
        "processing_seconds": 70.0,
        "output_tokens_per_s": 3.0,  # 300 / 100
        "ratio_to_plain": 0.5,
        "processing_output_tokens_per_s": 4.2857,  # 300 / 70
        "processing_ratio_to_plain": 0.5714,  # 4.2857 / (300 / 40)
        "prefill_prompt_tokens_per_s": 40.0,
        "prefill_rows_per_s": 0.2,
        "decode_output_tokens_per_s": 7.25,
        "decode_rows_per_s": 0.25,
        "achieved_rows_per_s": 0.1429,  # (11 - 1 errored) / 70
        "slower_pool": "prefill",
        "efficiency": 0.7143,  # 0.142857 / 0.2
        "prefill_compute_share": 0.8,
        "decode_bandwidth_share": 0.6,
        "decode_step_p50_seconds": 0.02,
        "decode_step_p99_seconds": 0.05,
        "decode_step_stddev_seconds": 0.004,
        "inter_token_p99_seconds": 0.06,
        "kv_bytes_per_prompt_token": 46080.0,
        "kv_handoff_share_of_prefill": 0.07,
        "peak_rss_bytes": 6 * GIB,
        "object_store_peak_bytes": 300 * 2**20,
    }


def test_colocated_pool_stands_in_both_columns_and_plain_has_no_pools():
    colocated, plain = mode_row("colocated", COLOCATED, PLAIN), mode_row("plain", PLAIN, PLAIN)
    # One pool, 60 busy seconds: 10 rows, 2000 prompt and 300 output tokens.
    assert (colocated["prefill_rows_per_s"], colocated["decode_rows_per_s"]) == (0.1667, 0.1667)
    assert (colocated["prefill_prompt_tokens_per_s"], colocated["decode_output_tokens_per_s"]) == (33.3333, 5.0)
    assert (colocated["slower_pool"], colocated["efficiency"]) == ("colocated", 0.9231)  # (10 / 65) / (10 / 60)
    assert (colocated["pools"], colocated["ratio_to_plain"]) == ("1 colocated", 0.625)
    # Plain vLLM: processing is its generate call, start-up the rest of its wall time.
    assert (plain["startup_seconds"], plain["processing_seconds"], plain["achieved_rows_per_s"]) == (10.0, 40.0, 0.25)
    assert plain["pools"] is plain["efficiency"] is plain["prefill_rows_per_s"] is None
    assert plain["object_store_peak_bytes"] is None
    assert plain["decode_step_p99_seconds"] is None and colocated["decode_step_p99_seconds"] is None
    assert plain["ratio_to_plain"] == plain["processing_ratio_to_plain"] == 1.0


def test_a_modes_row_is_its_fastest_round():
    slow, fast = {**COLOCATED, "processing_seconds": 75.0}, {**COLOCATED, "processing_seconds": 60.0}
    failed = {"error": "pools.colocated asks 1 x {CPU: 9}"}
    assert fastest([slow, failed, fast]) == {**fast, "rounds_output_tokens_per_s": [4.0, 5.0]}  # 300 / 75, 300 / 60
    assert fastest([failed]) == failed


def test_processing_window_spans_the_engine_pools_batches():
    timeline = [
        BatchPoint("tokenize", 1.0, 1.0, 4, 200, 0),  # before the engines were up: start-up
        BatchPoint("prefill", 30.0, 28.0, 3, 200, 3),  # the first engine batch starts at 2
        BatchPoint("decode", 70.0, 40.0, 3, 0, 90),
        BatchPoint("prefill", 61.0, 31.0, 3, 200, 3),
        BatchPoint("decode", 95.0, 34.0, 2, 0, 64),  # the last ends at 95
        BatchPoint("detokenize", 96.0, 1.0, 8, 0, 160),
    ]
    assert processing_window(timeline, ["prefill", "decode"]) == (2.0, 95.0)
    assert processing_window(timeline, ["colocated"]) is None
    # The sink's clock started 3 s into the job.
    assert _window(timeline, 3.0) == (5.0, 93.0)  # (start-up, processing)
    assert _window([], 3.0) == (None, None)


def test_markdown_table_one_row_per_mode():
    rows = bench_rows({**RESULTS, "disaggregated": {"error": "pools.decode asks 3 x {CPU: 0.4} | more"}})
    lines = markdown(rows)
    assert lines[0].startswith("| mode | pools | wall s | start-up s | processing s | output tok/s | x plain |")
    assert lines[1].startswith("|---|---|--:|")
    assert len(lines) == 5 and all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])
    assert lines[2].startswith(
        "| plain | - | 50.0 | 10.0 | 40.0 | 6.0 | 1.00 | 7.5 | 1.00 | - | - | - | - | 0.25 | - | - |"
    )
    assert lines[2].endswith("| - | - | 4.00 | - |")
    assert lines[3].startswith(
        "| colocated | 1 colocated | 80.0 | 10.0 | 65.0 | 3.8 | 0.62 | 4.6 | 0.62 | 33 | 0.17 | 5.0 |"
    )
    assert lines[3].endswith("| 92% | colocated | - | - | - | - | - | - | - | - | 5.00 | 300 |")
    assert lines[4].startswith("| disaggregated | not run: pools.decode asks 3 x {CPU: 0.4} \\| more | - |")


def test_write_puts_json_table_and_plot_in_the_folder(tmp_path):
    rows = bench_rows(RESULTS)
    write(tmp_path, RESULTS, rows)
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["disaggregated"]["stages"]["prefill"]["busy_seconds"] == 50.0 and bench["table"] == rows
    assert (tmp_path / "bench.md").read_text().splitlines() == markdown(rows)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_a_bench_with_a_mode_that_did_not_run_cannot_calibrate(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({**RESULTS, "disaggregated": {"error": "pools.decode asks ..."}}))
    with pytest.raises(JobError, match="disaggregated: pools.decode asks"):
        load_bench(str(path))


def sweep_job(folder, results: dict):
    folder.mkdir(parents=True)
    write(folder, results, bench_rows(results))
    return folder / BENCH_JSON


def test_sweep_combines_its_jobs_against_the_first_plain_run(tmp_path):
    first = sweep_job(tmp_path / "pools.decode.size=1", RESULTS)
    second = sweep_job(tmp_path / "pools.decode.size=2", {"disaggregated": DISAGGREGATED})
    rows = combine(
        [
            ("pools.decode.size=1", first),
            ("pools.decode.size=2", second),
            ("pools.decode.size=3", "failed: RuntimeError: engine died"),
        ]
    )
    assert [(r["run"], r["mode"]) for r in rows] == [
        ("pools.decode.size=1", "plain"),
        ("pools.decode.size=1", "colocated"),
        ("pools.decode.size=1", "disaggregated"),
        ("pools.decode.size=2", "disaggregated"),
        ("pools.decode.size=3", "-"),
    ]
    assert rows[3]["ratio_to_plain"] == 0.5  # against the first job's plain vLLM: 3.0 / 6.0
    assert rows[4]["error"] == "failed: RuntimeError: engine died"
    lines = markdown(rows)
    assert lines[0].startswith("| run | mode | pools |")
    assert lines[5].startswith("| pools.decode.size=2 | disaggregated | 1 prefill + 2 decode | 100.0 |")
    assert lines[6].startswith("| pools.decode.size=3 | - | not run: failed: RuntimeError: engine died | - |")


def job_end(callback: SweepTable, run: str, outcome) -> None:
    config = OmegaConf.create({"hydra": {"overrides": {"task": ["input.path=x", run, "sampling.max_tokens=8"]}}})
    done = JobReturn(status=JobStatus.COMPLETED if isinstance(outcome, str) else JobStatus.FAILED)
    done.return_value = outcome
    callback.on_job_end(config, done)


def test_sweep_table_callback_writes_the_table_after_each_job(tmp_path, capsys):
    callback = SweepTable()
    job_end(callback, "pools.decode.size=1", str(sweep_job(tmp_path / "single", RESULTS)))
    assert not (tmp_path / "bench.md").exists()  # outside a sweep the run writes its own

    overrides = ["input.path=x", "pools.decode.size=1,2", "sampling.max_tokens=8"]
    sweep = {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": overrides}}
    callback.on_multirun_start(OmegaConf.create({"hydra": sweep}))
    job_end(callback, "pools.decode.size=1", str(sweep_job(tmp_path / "pools.decode.size=1", RESULTS)))
    assert len((tmp_path / "bench.md").read_text().splitlines()) == 2 + 3
    job_end(callback, "pools.decode.size=2", ValueError("boom"))
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "not run: failed: ValueError: boom" in table[-1]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [r["run"] for r in bench["runs"]] == ["pools.decode.size=1", "pools.decode.size=2"]  # what the sweep varies
    assert table[2].startswith("| pools.decode.size=1 | plain |")
    assert (tmp_path / "bench.png").exists()


def bench_config(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(
            "bench", overrides=["input.path=unset", "output.path=/tmp/unset", *overrides], return_hydra_config=hydra
        )


def test_bench_config_composes_with_modes_and_a_sweep_folder_per_split():
    bench = OmegaConf.to_object(bench_config("bench.modes=[disaggregated]", "pools.decode.size=2", "bench.rounds=2"))
    assert bench.bench.modes == [BenchMode.disaggregated] and bench.bench.baselines_once and bench.bench.rounds == 2
    assert bench.pools.decode.size == 2 and bench.model.name == "smollm2-135m"
    cfg = bench_config("pools.decode.size=2", hydra=True)
    assert cfg.hydra.sweep.dir == "/tmp/unset" and cfg.hydra.callbacks.sweep_table._target_.endswith("SweepTable")
    assert "input.path" in cfg.hydra.job.config.override_dirname.exclude_keys
    with pytest.raises(ConfigCompositionException):
        bench_config("bench.modes=[speculative]")


@pytest.mark.parametrize(
    ("mode", "num", "once", "expected"),
    [
        (RunMode.RUN, None, True, list(BenchMode)),
        (RunMode.MULTIRUN, 0, True, list(BenchMode)),
        (RunMode.MULTIRUN, 1, True, [BenchMode.disaggregated]),
        (RunMode.MULTIRUN, 1, False, list(BenchMode)),
    ],
)
def test_later_jobs_of_a_sweep_skip_the_baselines(mode, num, once, expected):
    cfg = bench_config("bench.modes=[disaggregated,plain,colocated]", f"bench.baselines_once={once}", hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = mode
        if num is not None:  # a single run has no job number
            cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)
    try:
        assert modes(OmegaConf.to_object(cfg.bench), later_job_of_sweep()) == expected  # in the order they run
    finally:
        HydraConfig.instance().cfg = None


CHILD = """
import subprocess, sys, time
held = b"x" * (100 << 20)  # written, so resident
if sys.argv[1] == "parent":
    grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[2], "leaf", ""], stdout=subprocess.PIPE)
    grandchild.stdout.readline()
print("ready", flush=True)
time.sleep(60)
"""


def test_rss_sampler_sums_the_process_tree():
    # This process's own memory: the session's Ray workers, also descendants where an earlier
    # test started Ray, come and go and grow and shrink meanwhile.
    own = psutil.Process().memory_info().rss
    child = subprocess.Popen([sys.executable, "-c", CHILD, "parent", CHILD], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        tree = psutil.Process(child.pid)
        (grandchild,) = tree.children()  # a grandchild of this process
        assert tree_rss(tree) >= 200 << 20
        with ProcessTreeRSSPeak(interval=0.05) as peak:
            time.sleep(0.2)
        assert peak.peak >= own + tree_rss(tree) - (20 << 20)
    finally:
        for process in psutil.Process(child.pid).children(recursive=True) + [child]:
            process.kill()
        child.wait()
    assert not {child.pid, grandchild.pid} & {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("prefixes", [1, 3])
def test_shared_prefix_workload_shares_its_first_tokens_and_no_more(tmp_path, model, prefixes):
    """Row i begins with text i % prefixes: rows of one text share its tokens, rows of two do not."""
    settings = SharedPrefixSettings(rows=30, prefixes=prefixes)
    cfg = job_config()
    encoder = PromptEncoder(model, cfg.input, cfg.sampling.max_tokens)
    common = write_workload(tmp_path / "prompts.parquet", settings, encoder)
    prompts = pq.read_table(tmp_path / "prompts.parquet").column("prompt")
    tokens, errors = encoder.encode_all(prompt_values(prompts), [None] * len(prompts))
    assert errors == [None] * settings.rows and len(set(map(tuple, tokens))) == settings.rows
    groups = [tokens[k::prefixes] for k in range(prefixes)]
    assert len(os.path.commonprefix(groups[0])) == common
    for group in groups:
        shared = len(os.path.commonprefix(group))
        assert shared >= settings.shared_tokens
        assert all(settings.unique_tokens_min <= len(t) - shared <= settings.unique_tokens_max for t in group)
    if prefixes > 1:
        assert len(os.path.commonprefix([g[0] for g in groups])) < settings.shared_tokens // 2
