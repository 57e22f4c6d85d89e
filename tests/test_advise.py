"""jobs.advise: the sample (the same for a seed, spread over every file and row group), the
verdict on the split and its reasons on constructed planner figures, the commands it prints as
jobs.generate configs, and one end-to-end run on the bundled model."""

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.bench.advice import OUTPUT, Choice, SampleRun, command, decide, planned, user_overrides
from pipeline.bench.advice_report import job_sized
from pipeline.bench.advise import advise, sample_indices, take_rows
from pipeline.bench.config import AdviseConfig, AdviseSettings, register
from pipeline.bench.verdict import split_reasons
from pipeline.config import InputConfig, Mode
from pipeline.errors import JobError
from pipeline.io.source import PromptSource
from pipeline.job.validate import check_job
from pipeline.plan.roofline import Efficiency, Forecast, Hardware, ModelSpec, Planner, PlanSettings, Pool, Workload
from tests.conftest import job_config
from tests.test_bench import DISAGGREGATED, PLAIN

REPO = Path(__file__).resolve().parents[1]
register()

# Round numbers, as in tests/test_planner.py: 20,000 B of KV per token, 2e9 B of weights.
MODEL = ModelSpec(name="round", params=1e9, layers=10, kv_heads=5, head_dim=100, dtype_bytes=2)
HALF = Efficiency(prefill=0.5, decode=0.5, network=0.5)
# Compute-rich and expensive; bandwidth-poor, compute-poor and cheap.
FAST = Hardware(name="fast", tflops=100, mem_bw_gbs=1000, mem_gib=80, usd_per_hour=4.0, idle_watts=50, busy_watts=500)
SLOW = Hardware(name="slow", tflops=5, mem_bw_gbs=250, mem_gib=80, usd_per_hour=0.5, idle_watts=20, busy_watts=100)


WORKLOAD = Workload(prompt_tokens=1250, output_tokens=500, rows=1000)


def planner(workload: Workload = WORKLOAD, **settings) -> Planner:
    return Planner(MODEL, workload, HALF, PlanSettings(**{"max_batch": 100, "max_devices": 5, **settings}))


def advise_config(*overrides: str) -> AdviseConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("advise", overrides=list(overrides)))


def test_the_sample_is_the_same_for_a_seed_and_takes_one_row_from_each_stretch():
    rows = sample_indices(10_000, 64, seed=0)
    assert np.array_equal(rows, sample_indices(10_000, 64, seed=0))
    assert not np.array_equal(rows, sample_indices(10_000, 64, seed=1))
    edges = np.arange(65) * 10_000 // 64  # the input in 64 stretches of 156 or 157 rows: one row from each
    assert np.all(edges[:-1] <= rows) and np.all(rows < edges[1:])
    assert list(sample_indices(50, 64, seed=0)) == list(range(50))  # a smaller input: all of it


def test_the_sample_reads_its_rows_from_every_file_and_row_group_with_every_column(tmp_path):
    for part in range(3):  # 3 files of 100 rows, in row groups of 30
        ids = [f"r{part * 100 + i:03d}" for i in range(100)]
        table = pa.table({"id": ids, "prompt": [f"p{i}" for i in ids], "n": list(range(100))})
        pq.write_table(table, tmp_path / f"part-{part}.parquet", row_group_size=30)
    source = PromptSource(InputConfig(path=str(tmp_path)), 1000, ("prompt",))
    assert source.num_rows == 300
    rows = sample_indices(300, 20, seed=3)
    sample = take_rows(source, rows)
    assert sample.column_names == ["id", "prompt", "n"]
    assert sample.column("id").to_pylist() == [f"r{i:03d}" for i in rows]
    assert sample.column("prompt").to_pylist() == [f"pr{i:03d}" for i in rows]


def choice(mode: str, usd: float) -> Choice:
    return Choice("x", mode, "1 x", None, 1.0, Forecast(1.0, usd, 1.0), "decode", "planned", (f"mode={mode}",))


def test_the_split_is_chosen_only_when_it_saves_enough_and_its_tokens_are_colocateds():
    colocated, split = choice("colocated", 1.0), choice("disaggregated", 0.9)
    assert decide([colocated, split], 0.05, identical=True)[0] is split
    assert decide([colocated, split], 0.15, identical=True)[0] is colocated  # saves 10%: does not pay
    assert decide([colocated, split], 0.05, identical=False)[0] is colocated
    plain = Choice("x", "plain", "1", None, 1.0, Forecast(1.0, 0.1, 1.0), "-", "measured", None)
    assert decide([plain, colocated], 0.05, identical=True) == (colocated, colocated, None)  # plain is a reference


def test_a_slow_network_is_named_as_what_holds_the_split_back():
    p = planner(network_gbps=0.8)
    colocated, split = p.colocated(Pool(FAST, 1)), p.disaggregated(Pool(FAST, 1), Pool(SLOW, 1))
    assert split.bound == "network"
    reasons = split_reasons(p, colocated, split, [colocated, split])
    # 1250 prompt tokens x 20,000 B = 25 MB per prompt: 0.5 x 0.1 GB/s carries 2 a second.
    assert any(
        r.startswith("the split is bound by the network: 0.05 GB/s of KV, 23.84 MiB per prompt") for r in reasons
    )


def test_short_prompts_on_a_device_cheapest_for_both_phases_are_the_reasons_given():
    # 50 prompt and 500 output tokens a row. Prefill: 50 / 25,000 tok/s = 2 ms; decode: 100 sequences
    # of 300 tokens x 20,000 B and 2e9 B of weights a step, 2.6e9 B / 5e11 B/s = 5.2 ms for 100
    # tokens: 500 tokens take 26 ms. Prefill is 7% of the time.
    p = planner(Workload(50, 500, 1000))
    colocated, split = p.colocated(Pool(FAST, 1)), p.disaggregated(Pool(FAST, 1), Pool(FAST, 1))
    reasons = split_reasons(p, colocated, split, [colocated, split])
    assert reasons[0].startswith("short prompts: prefill is 7% of a colocated fast's time (50 prompt and 500 output")
    assert reasons[1].startswith("one kind of device (fast)")
    cheap = Hardware(name="cheap", tflops=1, mem_bw_gbs=100, mem_gib=80, usd_per_hour=2.0, idle_watts=1, busy_watts=2)
    both = split_reasons(p, colocated, split, [colocated, p.disaggregated(Pool(FAST, 1), Pool(cheap, 1))])
    # Prefill: $4/h for 25,000 tok/s against $2/h for 250; decode: $4/h for 19,231 tok/s against $2/h for 1,923.
    assert both[1].startswith(
        "fast is the cheapest device for both phases: prefill $0.04444 per million prompt tokens on fast (next: "
        "cheap, $2.222), decode $0.05778 per million output tokens on fast (next: cheap, $0.2889)"
    )


def test_a_job_too_small_for_every_device_past_its_start_up_is_planned_on_fewer():
    """The round model on FAST: 1,000 rows of 500 output tokens. Its best option makes about
    5,000 output tok/s per device; a 300 s start-up within 10% of the run needs 150M output
    tokens a device: 0.5M make none worth it beyond a split's two engines, 100x as many 3,
    1,000x as many all 5."""
    settings = AdviseSettings(gpu_startup_s=300, startup_share=0.1)
    small = job_sized(planner(), [FAST, SLOW], settings)
    assert small.settings.max_devices == 2
    assert {sum(p.devices for p in o.pools) for o in small.options([FAST, SLOW])} <= {1, 2}
    per_device = max(o.output_tokens_per_s / sum(p.devices for p in o.pools) for o in planner().options([FAST, SLOW]))
    assert per_device == 5000
    for rows, most in ((100_000, 3), (1_000_000, 5)):
        assert job_sized(planner(replace(WORKLOAD, rows=rows)), [FAST, SLOW], settings).settings.max_devices == most


def test_each_further_row_takes_the_slower_pools_busy_time_per_sample_row_refused_ones_too():
    """The bench's split: 11 sample rows, 10 through the engines (one refused before them); the
    prefill worker busy 50 s, each of 2 decode workers 40 s. A further input row takes 50 / 11 s,
    as the refused rows among them take no engine time, and decode is busy 80% of it."""
    sample = SampleRun.of(DISAGGREGATED, cores=2, rows=11)
    assert sample.per_row == 50 / 11 and sample.steady == {"prefill": 1.0, "decode": 0.8}
    assert SampleRun.of(PLAIN, cores=2, rows=11).per_row == 40 / 11  # its generate call's


def test_decode_held_back_by_memory_is_a_reason():
    small = Hardware(name="small", tflops=50, mem_bw_gbs=500, mem_gib=8, usd_per_hour=1, idle_watts=10, busy_watts=50)
    p = planner()
    colocated, split = p.colocated(Pool(FAST, 1)), p.disaggregated(Pool(FAST, 1), Pool(small, 1))
    # 0.9 x 8 GiB less 2e9 B of weights holds 191 sequences of 1500 tokens x 20,000 B, capped at 100;
    # 0.9 x 4 GiB holds 62.
    tight = p.disaggregated(Pool(FAST, 1), Pool(replace(small, mem_gib=4), 1))
    assert split.batch == 100 and tight.batch == 62
    assert not any("holds" in r for r in split_reasons(p, colocated, split, [colocated, split]))
    assert any(
        r.startswith("decode on small holds 62 sequences beside 2 GB of weights")
        for r in split_reasons(p, colocated, tight, [colocated, tight])
    )


def test_the_printed_commands_are_jobs_generate_configs_that_pass_its_checks(tmp_path):
    task = [
        "input.path=in.parquet",
        "output.path=advice",
        "sampling.max_tokens=16",
        "hardware=[h100]",
        "pools.decode.size=1",
    ]
    assert user_overrides(task, here=False) == ["sampling.max_tokens=16"]
    assert user_overrides(task, here=True) == ["sampling.max_tokens=16", "pools.decode.size=1"]
    split = planned(planner().disaggregated(Pool(FAST, 1), Pool(SLOW, 4)), 1e6)
    line = command("my prompts.parquet", task, split)
    assert line.startswith(
        f"python -m jobs.generate 'input.path=my prompts.parquet' output.path={OUTPUT} sampling.max_tokens=16 "
    )
    job = generate_config(line, tmp_path)
    check_job(job)
    assert job.mode is Mode.disaggregated and (job.pools.prefill.size, job.pools.decode.size) == (1, 4)
    assert job.sampling.max_tokens == 16 and job.input.path == "my prompts.parquet"


def generate_config(line: str, output: Path):
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", "jobs.generate"]
    return job_config(*(w.replace(OUTPUT, str(output)) for w in words[3:]))


def test_advise_config_composes_the_catalogue_and_the_machine_at_hand():
    cfg = advise_config("input.path=x", "output.path=y", "hardware=[l4,a10g]", "advise.sample_rows=64")
    assert sorted(cfg.hardware) == ["a10g", "l4"] and list(cfg.machine) == ["cpu-core"]
    assert cfg.machine["cpu-core"].device == "cpu" and cfg.advise.sample_rows == 64 and cfg.plan.max_devices == 8
    gpu = advise_config("input.path=x", "output.path=y", "hardware@machine=h100")
    assert list(gpu.machine) == ["h100"] and sorted(gpu.hardware) == ["a100", "a10g", "h100", "l4"]


def test_a_machine_entry_for_another_device_is_refused_before_any_work(sample_prompts, tmp_path):
    cfg = advise_config(f"input.path={sample_prompts}", f"output.path={tmp_path}", "hardware@machine=h100")
    with pytest.raises(JobError, match=r"the machine at hand is h100 \(cuda\) but engine.device=cpu"):
        advise(cfg, [])
    assert not (tmp_path / "_sample.parquet").exists()


def test_cli_input_error_is_one_line_with_exit_code_2(tmp_path):
    command = [sys.executable, "-m", "jobs.advise", f"input.path={tmp_path}/none.parquet", f"output.path={tmp_path}/a"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (
        done.returncode == 2
        and done.stderr.strip() == f"kvrelay: error: input.path {tmp_path}/none.parquet does not exist"
    )


@pytest.mark.slow
def test_advise_on_a_64_row_sample_measures_checks_identity_and_prints_a_command_jobs_generate_accepts(
    ray_cluster, sample_prompts, tmp_path
):
    task = [
        f"input.path={sample_prompts}",
        f"output.path={tmp_path}",
        "advise.sample_rows=64",
        "sampling.max_tokens=16",
        "bench.modes=[colocated,disaggregated]",  # plain vLLM's baseline costs a third more time
        "hardware=[h100,l4]",
    ]
    said = advise(advise_config(*task), task)
    figures = json.loads((tmp_path / "_advice.json").read_text())
    assert (tmp_path / "_advice.md").read_text() == "\n".join(said.lines) + "\n"
    assert pq.read_metadata(tmp_path / "_sample.parquet").num_rows == 64
    assert figures["identity"] == {"identical": True, "rows_compared": 64, "rows_differing": 0, "differing_ids": []}
    assert figures["input"]["rows"] == 320 and figures["workload"]["rows"] == 320
    modes = {(o["hardware"], o["mode"]): o for o in figures["options"]}
    assert set(modes) >= {("cpu-core", "colocated"), ("cpu-core", "disaggregated"), ("h100", "colocated")}
    for option in figures["options"]:
        assert all(option[key] > 0 for key in ("hours", "usd", "kwh", "output_tokens_per_s", "usd_per_m_tokens"))
    # The machine at hand's whole job: the sample's run as measured, then 256 more rows at the rate
    # its engine pool kept while busy.
    metrics = json.loads((tmp_path / "bench" / "bench.json").read_text())["colocated"]
    pool = metrics["stages"]["colocated"]
    per_row = pool["busy_seconds"] / pool["size"] / metrics["rows_in"]
    expected = metrics["wall_seconds"] + (320 - 64) * per_row
    assert modes[("cpu-core", "colocated")]["hours"] * 3600 == pytest.approx(expected)
    assert 0 < figures["efficiency"]["machine"]["prefill"] and 0 < figures["efficiency"]["machine"]["handoff"] < 0.5
    assert figures["verdict"].startswith("the split ") and figures["reasons"]
    for key in ("recommendation", "here"):
        job = generate_config(figures[key]["command"], tmp_path / "out")
        check_job(job)
        assert job.sampling.max_tokens == 16 and job.mode.value == figures[key]["mode"]
    assert "## Recommendation" in said.lines and f"    {figures['recommendation']['command']}" in said.lines
