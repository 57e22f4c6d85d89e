"""The capacity planner against hand-computed rooflines, its choices on constructed catalogues,
calibration on a real jobs.bench result, the Hydra config and the command line."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pipeline.config import Mode
from pipeline.errors import JobError
from pipeline.plan.config import PlanConfig, register
from pipeline.plan.roofline import Efficiency, Hardware, ModelSpec, Planner, PlanSettings, Workload, catalogue, cheapest
from tests.conftest import job_config

REPO = Path(__file__).resolve().parents[1]
BENCH = str(REPO / "tests" / "fixtures" / "bench.json")
register()

# Round numbers, so each expectation below can be checked by hand.
# KV per token = 2 * 10 layers * 5 heads * 100 dims * 2 bytes = 20,000 B; weights 2e9 B.
MODEL = ModelSpec(name="round", params=1e9, layers=10, kv_heads=5, head_dim=100, dtype_bytes=2)
# Mean context in decode = 1250 + 500 / 2 = 1500 tokens: 3e7 B of KV per sequence.
WORKLOAD = Workload(prompt_tokens=1250, output_tokens=500, rows=1000)
HALF = Efficiency(prefill=0.5, decode=0.5, network=0.5)
# Compute-rich and expensive; bandwidth-poor, compute-poor and cheap.
FAST = Hardware(name="fast", tflops=100, mem_bw_gbs=1000, mem_gib=80, usd_per_hour=4.0)
SLOW = Hardware(name="slow", tflops=5, mem_bw_gbs=250, mem_gib=80, usd_per_hour=0.5)


def planner(**settings) -> Planner:
    return Planner(MODEL, WORKLOAD, HALF, PlanSettings(**{"max_batch": 100, "max_devices": 5, **settings}))


def plan_config(*overrides: str) -> PlanConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("plan", overrides=list(overrides)))


def test_kv_and_weight_bytes_of_the_catalogued_models():
    cfg = plan_config()
    assert cfg.model_spec.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert cfg.model_spec.weight_bytes == pytest.approx(16.06e9)
    # What the pipeline measured moving SmolLM2's KV in fp32 (metrics kv_bytes_per_prompt_token).
    assert plan_config("model_spec=smollm2-135m").model_spec.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080


def test_prefill_and_decode_rooflines():
    p = planner()
    # 0.5 * 100e12 FLOP/s / (2 * 1e9 FLOP per token)
    assert p.prefill_rate(FAST) == pytest.approx(25_000)
    # Batch capped at max_batch = 100; step reads 2e9 + 100 * 3e7 = 5e9 B at 0.5 * 1e12 B/s = 10 ms.
    assert p.decode_batch(FAST) == 100
    assert p.decode_rate(FAST) == pytest.approx(100 / 0.010)
    # 0.5 * 250e9 B/s: a 40 ms step, 2,500 tokens/s.
    assert p.decode_rate(SLOW) == pytest.approx(2_500)


def test_decode_batch_is_what_fits_beside_the_weights():
    p = planner(max_batch=1000, memory_utilization=1.0)
    # (4 * 2**30 - 2e9) / 3e7 = 2,294,967,296 / 3e7 = 76.5
    assert p.decode_batch(Hardware(name="small", tflops=1, mem_bw_gbs=1, mem_gib=4, usd_per_hour=1)) == 76
    # 1.88 GiB = 2.0186e9 B: the weights and not one sequence; the model does not fit.
    tiny = Hardware(name="tiny", tflops=1, mem_bw_gbs=1, mem_gib=1.88, usd_per_hour=1)
    assert p.decode_batch(tiny) < 1
    with pytest.raises(JobError, match="does not fit"):
        p.options([tiny])


def test_colocated_time_shares_each_device():
    # Per request: 1250 / 25,000 = 0.05 s of prefill + 500 / 10,000 = 0.05 s of decode.
    option = planner().colocated(FAST, 2)
    assert option.requests_per_s == pytest.approx(2 / 0.1)
    assert option.output_tokens_per_s == pytest.approx(20 * 500)
    # $8/h for 10,000 tokens/s = 36e6 tokens/h
    assert option.usd_per_m_tokens == pytest.approx(8 / 36)
    assert option.kv_gb_per_s == 0


def test_disaggregated_is_the_least_of_prefill_decode_and_network():
    # Prefill: 25,000 / 1250 = 20 requests/s; decode on SLOW: 2,500 / 500 = 5; network:
    # 0.5 * 12.5e9 B/s / (1250 * 20,000 B) = 250.
    option = planner().disaggregated(FAST, 1, SLOW, 1)
    assert (option.requests_per_s, option.bound) == (pytest.approx(5), "decode")
    assert option.kv_gb_per_s == pytest.approx(5 * 2.5e7 / 1e9)
    # 0.8 Gb/s NICs: 0.5 * 1e8 B/s / 2.5e7 B = 2 requests/s.
    slow_net = planner(network_gbps=0.8).disaggregated(FAST, 1, SLOW, 1)
    assert (slow_net.requests_per_s, slow_net.bound) == (pytest.approx(2), "network")
    # NICs of 1.6 Gb/s in the catalogue take precedence: 4 requests/s.
    fast, slow = (replace(hw, nic_gbps=1.6) for hw in (FAST, SLOW))
    assert planner(network_gbps=0.8).disaggregated(fast, 1, slow, 1).requests_per_s == pytest.approx(4)


def test_best_split_matches_prefill_to_decode():
    # One FAST prefills 20 requests/s, four SLOW decode 4 * 5: 20 requests/s for $6/h, $0.1667/M.
    # 1 + 3 gives 15 requests/s for $5.5/h ($0.204/M); 2 + 3 gives 15 for $9.5/h.
    best = planner().best_split(FAST, SLOW)
    assert [n for _, n in best.pools] == [1, 4]
    assert best.usd_per_m_tokens == pytest.approx(6 / 36)


def test_recommends_disaggregated_when_it_pays():
    # Colocated: FAST $0.222/M (above); SLOW 1250 / 1250 + 500 / 2500 = 1.2 s per request, $0.333/M.
    best = cheapest(planner().options([FAST, SLOW]))
    assert best.mode == "disaggregated" and [hw.name for hw, _ in best.pools] == ["fast", "slow"]


def test_recommends_colocated_when_the_network_is_too_slow():
    options = planner(network_gbps=0.8).options([FAST, SLOW])
    best = cheapest(options)
    assert best.mode == "colocated" and best.pools == ((FAST, 5),)
    assert all(o.bound == "network" for o in options if o.mode == "disaggregated" and o.pools[0][0] == FAST)


def test_equally_cheap_splits_prefer_the_bigger_one():
    # FAST -> FAST: 20 requests/s per pool device either side; 1 + 1 and 2 + 2 cost the same per token.
    assert [n for _, n in planner().best_split(FAST, FAST).pools] == [2, 2]
    assert [n for _, n in planner(prefill_size=1).best_split(FAST, FAST).pools] == [1, 1]


def test_overrides_are_jobs_generate_config():
    disaggregated = planner().best_split(FAST, SLOW)
    job = job_config(*disaggregated.hydra_overrides())
    assert job.mode is Mode.disaggregated and job.engine.device == "cuda"
    assert (job.pools.prefill.size, job.pools.decode.size, job.pools.decode.num_gpus) == (1, 4, 1.0)
    assert (job.pools.decode.max_num_seqs, job.pools.decode.batch_size) == (100, 50)
    cpu = Hardware(name="cpu", device="cpu", tflops=0.1, mem_bw_gbs=10, mem_gib=80, usd_per_hour=0.1)
    job = job_config(*planner().colocated(cpu, 2).hydra_overrides())
    assert (job.mode, job.engine.device) == (Mode.colocated, "cpu")
    assert (job.pools.colocated.size, job.pools.colocated.num_gpus) == (2, 0.0)


def test_calibration_reproduces_the_bench_stage_rates():
    cfg = plan_config("model_spec=smollm2-135m", "hardware=[cpu-core]", "plan.max_batch=64")
    cpu = catalogue(cfg.hardware)[0]
    eff = Efficiency.from_bench(BENCH, cpu, cfg.model_spec, cfg.plan)
    # The catalogue's rough peaks are peaks: the measured rates stay below them.
    assert 0 < eff.prefill < 1 and 0 < eff.decode < 1
    # The bench's disaggregated run: 320 rows, 52,208 prompt and 18,272 output tokens; prefill
    # busy 221.133 s and decode 177.018 s, one worker on one core each.
    p = Planner(cfg.model_spec, Workload(52_208 / 320, 18_272 / 320, 320), eff, cfg.plan)
    assert p.prefill_rate(cpu) == pytest.approx(52_208 / 221.133)
    assert p.decode_rate(cpu) == pytest.approx(18_272 / 177.018)
    assert p.disaggregated(cpu, 1, cpu, 1).output_tokens_per_s == pytest.approx(18_272 / 221.133)


def test_workload_from_a_kvrelay_output_leaves_errored_rows_out(tmp_path):
    pq.write_table(
        pa.table(
            {
                "num_input_tokens": [100, 300, 7],
                "num_generated_tokens": [10, 30, 0],
                "error": [None, None, "prompt is empty"],
            }
        ),
        tmp_path / "out.parquet",
    )
    (tmp_path / "_metrics.json").write_text("{}")
    assert Workload.from_parquet(str(tmp_path)) == Workload(200, 20, 2)


def test_workload_from_token_ids_and_text(tmp_path, model):
    pq.write_table(pa.table({"prompt": [[1, 2, 3], [4], None]}), ids := tmp_path / "ids.parquet")
    assert Workload.from_parquet(str(ids), output_tokens=64) == Workload(2, 64, 2)
    pq.write_table(pa.table({"text": ["The capital of France is", "Hello"]}), text := tmp_path / "text.parquet")
    with pytest.raises(JobError, match="workload.tokenizer"):
        Workload.from_parquet(str(text), "text", output_tokens=64)
    counted = Workload.from_parquet(str(text), "text", tokenizer=model.path, output_tokens=64)
    assert counted.rows == 2 and 3 <= counted.prompt_tokens <= 5
    with pytest.raises(JobError, match="does not exist"):
        Workload.from_parquet(str(tmp_path / "missing"), output_tokens=64)


def test_plan_config_composes_with_overrides():
    cfg = plan_config(
        "hardware=[l4,cpu-core]", "hardware.l4.usd_per_hour=0.5", "plan.max_devices=3", "efficiency.decode=0.4"
    )
    assert sorted(cfg.hardware) == ["cpu-core", "l4"]
    assert (cfg.hardware["l4"].usd_per_hour, cfg.hardware["cpu-core"].device) == (0.5, "cpu")
    assert (cfg.plan.max_devices, cfg.efficiency.decode, cfg.workload.prompt_tokens) == (3, 0.4, 2048)
    assert sorted(plan_config().hardware) == ["a100", "a10g", "h100", "l4"]


@pytest.mark.parametrize(
    "override, message", [("plan.max_devices=many", "max_devices"), ("hardware=[h200]", "hardware/h200")]
)
def test_bad_plan_override_names_it(override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        plan_config(override)
    assert message in str(error.value) or message in str(error.value.__cause__)


def plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jobs.plan", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_and_the_overrides():
    done = plan_cli("hardware=[h100,l4]", "plan.max_devices=4")
    assert done.returncode == 0, done.stderr
    assert "disaggregated h100 -> l4" in done.stdout and "recommended:" in done.stdout
    assert "python -m jobs.generate mode=" in done.stdout and "pools." in done.stdout


def test_cli_calibrated_on_a_bench_states_what_the_bench_measured():
    done = plan_cli("model_spec=smollm2-135m", "hardware=cpu-core", f"calibrate.bench={BENCH}", "plan.max_batch=64")
    assert done.returncode == 0, done.stderr
    # Output tokens 18,272 over each mode's processing (and wall) seconds in the bench.
    assert (
        "bench output tok/s while processing (whole run, start-up included): "
        "plain 95.6 (88.4); colocated 86.5 (74.8); disaggregated 75.1 (63.5)"
    ) in done.stdout


def test_cli_input_error_is_one_line_with_exit_code_2(tmp_path):
    done = plan_cli(f"workload.path={tmp_path}/nothing.parquet")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"kvrelay: error: workload.path {tmp_path}/nothing.parquet does not exist"
