"""The capacity planner against hand-computed rooflines and energy, its choices on constructed
catalogues, calibration on a real jobs.bench result, the Hydra config and the command line."""

import re
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
from transformers import DeepseekV3Config, Qwen3NextConfig

from pipeline.config import Mode
from pipeline.engine.family import Family, geometry
from pipeline.errors import JobError
from pipeline.job.validate import check_job
from pipeline.plan.config import PlanConfig, register
from pipeline.plan.recommend import NOT_RUNNABLE, recommend
from pipeline.plan.roofline import (
    Efficiency,
    Forecast,
    Hardware,
    ModelSpec,
    Planner,
    PlanSettings,
    Pool,
    Workload,
    catalogue,
    cheapest,
)
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
# Compute-rich and expensive; bandwidth-poor, compute-poor and cheap. Busy, FAST draws 400 W
# above its idle 100 W, SLOW 80 W above its 20 W.
FAST = Hardware(name="fast", tflops=100, mem_bw_gbs=1000, mem_gib=80, usd_per_hour=4.0, idle_watts=100, busy_watts=500)
SLOW = Hardware(name="slow", tflops=5, mem_bw_gbs=250, mem_gib=80, usd_per_hour=0.5, idle_watts=20, busy_watts=100)


def planner(**settings) -> Planner:
    return Planner(MODEL, WORKLOAD, HALF, PlanSettings(**{"max_batch": 100, "max_devices": 5, **settings}))


def plan_config(*overrides: str) -> PlanConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("plan", overrides=list(overrides)))


def test_kv_and_weight_bytes_of_the_catalogued_models():
    cfg = plan_config()
    assert cfg.model_spec.cache.family is Family.attention
    assert cfg.model_spec.cache.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert cfg.model_spec.weight_bytes == pytest.approx(16.06e9)
    # What the pipeline measured moving SmolLM2's KV in fp32 (metrics kv_bytes_per_prompt_token).
    assert plan_config("model_spec=smollm2-135m").model_spec.cache.bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    assert plan_config("model_spec=llama-3.1-70b").model_spec.cache.bytes_per_token == 2 * 80 * 8 * 128 * 2


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2"])
def test_mla_models_keep_one_bf16_latent_per_layer_beside_fp8_weights(name):
    spec = plan_config(f"model_spec={name}").model_spec
    # kv_lora_rank 512 + qk_rope_head_dim 64, no key/value pair, no heads.
    assert spec.cache.family is Family.mla
    assert spec.cache.bytes_per_token == 61 * 576 * 2 == 70_272
    assert spec.cache.request_bytes(2048) == 2048 * 70_272
    assert spec.weight_bytes == spec.params  # one byte each


def test_hybrid_models_add_a_state_per_request_to_their_attention_layers_kv():
    qwen = plan_config("model_spec=qwen3-next-80b-a3b").model_spec.cache
    # 12 full-attention layers of 2 KV heads of 256; 36 Gated DeltaNet layers: conv state
    # 3 x (2 x 16 x 128 + 32 x 128) in bf16 and recurrent state 32 x 128 x 128 in float32.
    state = 36 * (3 * (2 * 16 * 128 + 32 * 128) * 2 + 32 * 128 * 128 * 4)
    assert (qwen.bytes_per_token, qwen.state_bytes) == (12 * 2 * 2 * 256 * 2, state)
    # The split moves every prompt token's KV but the last (decode computes it again), and the state.
    assert qwen.request_bytes(2048) == 2047 * 24_576 + state
    granite = plan_config("model_spec=granite-4.0-h-small").model_spec.cache
    # 4 attention layers of 8 KV heads of 128; 36 Mamba-2 layers: conv 3 x (8192 + 2 x 128) in
    # bf16 and SSM state 128 heads x 64 x 128 in float32.
    assert granite.bytes_per_token == 4 * 2 * 8 * 128 * 2
    assert granite.state_bytes == 36 * (3 * (8192 + 2 * 128) * 2 + 128 * 64 * 128 * 4) == 152_819_712


@pytest.mark.parametrize(
    "name, config, dtype_bytes",
    [("deepseek-v3", DeepseekV3Config, 2), ("qwen3-next-80b-a3b", Qwen3NextConfig, 2)],
)
def test_the_catalogue_is_what_family_py_reads_from_the_published_config(name, config, dtype_bytes):
    """transformers' defaults for these config classes are the published models': the catalogue's
    cache is the one resolve_model would read (only the MLA entry's fp8 weights differ)."""
    spec = plan_config(f"model_spec={name}").model_spec
    assert spec.cache == geometry(name, config(), dtype_bytes, max_model_len=4096)


def test_a_sliding_window_model_moves_and_keeps_its_window_only():
    # Mistral-7B-v0.1: 32 layers of 8 KV heads of 128, a 4096-token window in every layer.
    mistral = ModelSpec(
        name="mistral", params=7.2e9, family=Family.sliding, window=4096, layers=32, kv_heads=8, head_dim=128
    )
    p = Planner(mistral, Workload(prompt_tokens=10_000, output_tokens=500, rows=1), HALF, PlanSettings())
    assert p.kv_bytes_per_request == 4096 * 131_072
    assert p.kv_bytes_per_sequence() == 4096 * 131_072
    assert mistral.cache.request_bytes(1000) == 1000 * 131_072


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
    # Two of them hold it, each 3 of the 5 KV heads: 1.2 copies of a sequence's cache,
    # (3.76 * 2**30 - 2e9) / 3.6e7 = 56.6 sequences.
    assert p.engine_sizes(tiny, 5) == [2, 4] and p.decode_batch(tiny, 2) == 56
    with pytest.raises(JobError, match="does not fit .*max_devices=1; an engine needs 2 x tiny"):
        planner(max_devices=1).options([tiny])


def test_colocated_time_shares_each_device():
    # Per request: 1250 / 25,000 = 0.05 s of prefill + 500 / 10,000 = 0.05 s of decode.
    option = planner().colocated(Pool(FAST, 2))
    assert option.requests_per_s == pytest.approx(2 / 0.1)
    assert option.output_tokens_per_s == pytest.approx(20 * 500)
    # $8/h for 10,000 tokens/s = 36e6 tokens/h
    assert option.usd_per_m_tokens == pytest.approx(8 / 36)
    assert option.kv_gb_per_s == 0


def test_disaggregated_is_the_least_of_prefill_decode_and_network():
    # Prefill: 25,000 / 1250 = 20 requests/s; decode on SLOW: 2,500 / 500 = 5; network:
    # 0.5 * 12.5e9 B/s / (1250 * 20,000 B) = 250.
    option = planner().disaggregated(Pool(FAST, 1), Pool(SLOW, 1))
    assert (option.requests_per_s, option.bound) == (pytest.approx(5), "decode")
    assert option.kv_gb_per_s == pytest.approx(5 * 2.5e7 / 1e9)
    # 0.8 Gb/s NICs: 0.5 * 1e8 B/s / 2.5e7 B = 2 requests/s.
    slow_net = planner(network_gbps=0.8).disaggregated(Pool(FAST, 1), Pool(SLOW, 1))
    assert (slow_net.requests_per_s, slow_net.bound) == (pytest.approx(2), "network")
    # NICs of 1.6 Gb/s in the catalogue take precedence: 4 requests/s.
    fast, slow = (replace(hw, nic_gbps=1.6) for hw in (FAST, SLOW))
    assert planner(network_gbps=0.8).disaggregated(Pool(fast, 1), Pool(slow, 1)).requests_per_s == pytest.approx(4)


def test_a_colocated_pool_draws_its_busy_power():
    # 2 x 500 W for 10,000 output tokens/s: 0.1 J per token, 1e5 J = 1/36 kWh per million.
    option = planner().colocated(Pool(FAST, 2))
    assert option.watts == pytest.approx(1000)
    assert option.joules_per_token == pytest.approx(0.1)
    assert option.kwh_per_m_tokens == pytest.approx(1 / 36)


def test_a_split_pool_below_its_limit_idles_for_the_rest():
    # Decode-bound at 5 requests/s: SLOW decodes flat out (100 W); FAST could prefill 20 and is
    # busy a quarter of the time, 100 + 400 / 4 = 200 W. 300 W for 2,500 tokens/s.
    option = planner().disaggregated(Pool(FAST, 1), Pool(SLOW, 1))
    assert option.watts == pytest.approx(300)
    assert option.joules_per_token == pytest.approx(0.12)
    # Network-bound at 2 requests/s: prefill busy 2 / 20, 100 + 40 W; decode 2 / 5, 20 + 32 W.
    slow_net = planner(network_gbps=0.8).disaggregated(Pool(FAST, 1), Pool(SLOW, 1))
    assert slow_net.bound == "network" and slow_net.watts == pytest.approx(140 + 52)


def test_a_forecast_is_the_whole_job_at_the_options_throughput():
    # 36e6 output tokens at 10,000/s: one hour, of 2 devices at $4/h and 1 kW.
    forecast = planner().colocated(Pool(FAST, 2)).forecast(36e6)
    assert isinstance(forecast, Forecast)
    assert (forecast.hours, forecast.usd, forecast.kwh) == pytest.approx((1, 8, 1))


def test_the_handoff_takes_its_share_of_the_prefill_pools_time():
    handoff = Planner(MODEL, WORKLOAD, replace(HALF, handoff=0.2), PlanSettings(max_batch=100, max_devices=5))
    # FAST prefills 20 requests/s, 80% of them with the handoff: 16, under four SLOW's 20.
    split = handoff.disaggregated(Pool(FAST, 1), Pool(SLOW, 4))
    assert (split.requests_per_s, split.bound) == (pytest.approx(16), "prefill")
    # Prefill flat out, 500 W; decode busy 16 / 20 of the time: 4 x (20 + 80 x 0.8) W.
    assert split.watts == pytest.approx(500 + 336)
    # A colocated engine hands nothing off; a handoff of 0 changes nothing.
    assert handoff.colocated(Pool(FAST, 2)) == planner().colocated(Pool(FAST, 2))
    assert replace(HALF, handoff=0.0) == HALF and Efficiency().handoff == 0


def test_best_split_matches_prefill_to_decode():
    # One FAST prefills 20 requests/s, four SLOW decode 4 * 5: 20 requests/s for $6/h, $0.1667/M.
    # 1 + 3 gives 15 requests/s for $5.5/h ($0.204/M); 2 + 3 gives 15 for $9.5/h.
    [best] = planner().best_split(FAST, SLOW)
    assert best.pools == (Pool(FAST, 1), Pool(SLOW, 4))
    assert best.usd_per_m_tokens == pytest.approx(6 / 36)


def test_recommends_disaggregated_when_it_pays():
    # Colocated: FAST $0.222/M (above); SLOW 1250 / 1250 + 500 / 2500 = 1.2 s per request, $0.333/M.
    best = cheapest(planner().options([FAST, SLOW]))
    assert best.mode == "disaggregated" and [pool.hardware.name for pool in best.pools] == ["fast", "slow"]


def test_recommends_colocated_when_the_network_is_too_slow():
    options = planner(network_gbps=0.8).options([FAST, SLOW])
    best = cheapest(options)
    assert best.mode == "colocated" and best.pools == (Pool(FAST, 5),)
    assert all(o.bound == "network" for o in options if o.mode == "disaggregated" and o.pools[0].hardware == FAST)


def test_equally_cheap_splits_prefer_the_bigger_one():
    # FAST -> FAST: 20 requests/s per pool device either side; 1 + 1 and 2 + 2 cost the same per token.
    assert [pool.devices for pool in planner().best_split(FAST, FAST)[0].pools] == [2, 2]
    assert [pool.devices for pool in planner(prefill_size=1).best_split(FAST, FAST)[0].pools] == [1, 1]


def test_overrides_are_jobs_generate_config():
    [disaggregated] = planner().best_split(FAST, SLOW)
    job = job_config(*disaggregated.hydra_overrides())
    assert job.mode is Mode.disaggregated and job.engine.device == "cuda"
    assert (job.pools.prefill.size, job.pools.decode.size, job.pools.decode.num_gpus) == (1, 4, 1.0)
    assert (job.pools.decode.max_num_seqs, job.pools.decode.batch_size) == (100, 50)
    cpu = replace(SLOW, name="cpu", device="cpu", tflops=0.1, mem_bw_gbs=10, usd_per_hour=0.1)
    job = job_config(*planner().colocated(Pool(cpu, 2)).hydra_overrides())
    assert (job.mode, job.engine.device) == (Mode.colocated, "cpu")
    assert (job.pools.colocated.size, job.pools.colocated.num_gpus) == (2, 0.0)


def catalogue_planner(model: str, *overrides: str) -> tuple[Planner, dict[str, Hardware]]:
    """A planner of the default workload (2048 + 256 tokens) for a catalogued model."""
    cfg = plan_config(f"model_spec={model}", "hardware=[h100,l4]", *overrides)
    planner = Planner(cfg.model_spec, Workload(2048, 256, 1), cfg.efficiency, cfg.plan)
    return planner, {hw.name: hw for hw in catalogue(cfg.hardware)}


def test_moe_prefill_computes_with_the_active_params_and_decode_reads_them_all():
    p, hw = catalogue_planner("deepseek-v3", "plan.max_devices=16")
    # 0.5 * 989e12 FLOP/s / (2 * 37e9 FLOP per token)
    assert p.prefill_rate(hw["h100"]) == pytest.approx(0.5 * 989e12 / 74e9)
    # An engine of 16: its step reads 671e9 B of fp8 weights and 228 caches across 16 x 0.6 x 3.35e12 B/s.
    step = (671e9 + 228 * p.kv_bytes_per_sequence(16)) / (16 * 0.6 * 3350e9)
    assert p.decode_rate(hw["h100"], 16) == pytest.approx(228 / step / 16)


def test_an_mla_cache_is_copied_on_each_device_of_an_engine():
    p, _ = catalogue_planner("deepseek-v3")
    # One latent "head" cannot be split: 16 devices keep 16 copies of (2048 + 128) x 70,272 B.
    assert p.kv_bytes_per_sequence(16) == 16 * p.kv_bytes_per_sequence() == 16 * 2176 * 70_272
    # Llama's 8 KV heads split over up to 8 devices; over 16, each keeps one of them twice.
    llama, _ = catalogue_planner("llama-3.1-70b")
    assert llama.kv_bytes_per_sequence(8) == llama.kv_bytes_per_sequence()
    assert llama.kv_bytes_per_sequence(16) == 2 * llama.kv_bytes_per_sequence()


def test_an_engine_spans_the_devices_that_hold_the_model():
    p, hw = catalogue_planner("llama-3.1-70b")
    # 141.2e9 B of weights; 0.9 x 79.6 GiB = 76.9e9 B per H100: two hold them, with 12.6e9 B for
    # 17 sequences of 2176 x 327,680 B; four hold 233.
    assert p.engine_sizes(hw["h100"], 8) == [2, 4, 8]
    assert (p.decode_batch(hw["h100"], 2), p.decode_batch(hw["h100"], 4)) == (17, 233)
    # 0.9 x 22.5 GiB = 21.7e9 B per L4: four hold 87e9 B, eight 174e9 B, 32.7e9 B for 45 sequences.
    assert p.engine_sizes(hw["l4"], 8) == [8] and p.decode_batch(hw["l4"], 8) == 45
    # 17 sequences leave decode to the weights: engines of 8 (256 sequences) cost least per token.
    [colocated] = p.best_colocated(hw["h100"])
    assert colocated.pools == (Pool(hw["h100"], 8, 8),) and colocated.batch == 256


def test_a_model_too_big_for_max_devices_says_what_each_engine_needs():
    p, hw = catalogue_planner("deepseek-v3")
    # 671e9 B of weights: 8 H100s hold 615e9 B, 16 hold 1231e9 B; an L4 engine needs 32.
    with pytest.raises(JobError, match="within plan.max_devices=8; an engine needs 16 x h100, 32 x l4"):
        p.options(list(hw.values()))
    wider, _ = catalogue_planner("deepseek-v3", "plan.max_devices=16")
    # Each of 16 devices keeps every sequence's latent: (16 x 76.9e9 - 671e9) / (16 x 152.9e6) = 228.
    assert wider.engine_sizes(hw["h100"], 16) == [16] and wider.decode_batch(hw["h100"], 16) == 228
    assert [o.mode for o in wider.options(list(hw.values()))] == ["colocated"]


def test_splits_of_tensor_parallel_engines_are_shown_but_not_recommended():
    lines = recommend(plan_config("model_spec=llama-3.1-70b", "hardware=[h100,l4]", "plan.max_devices=16"))
    split = [line for line in lines if line.startswith("disaggregated")]
    assert split and all(line.startswith("disaggregated* ") for line in split) and NOT_RUNNABLE in lines
    assert next(line for line in lines if line.startswith("recommended:")).startswith("recommended: colocated on")
    assert not any("cheapest disaggregated" in line for line in lines)


def test_tensor_parallel_overrides_are_a_job_kvrelay_accepts():
    p, hw = catalogue_planner("llama-3.1-70b")
    [colocated] = p.best_colocated(hw["h100"])
    job = job_config(*colocated.hydra_overrides())
    check_job(job, paths=False)
    assert (job.engine.tensor_parallel_size, job.pools.colocated.size, job.pools.colocated.num_gpus) == (8, 1, 8)
    split = p.disaggregated(Pool(hw["h100"], 2, 2), Pool(hw["h100"], 2, 2))
    assert not split.runnable
    with pytest.raises(AssertionError, match="tensor-parallel"):
        split.hydra_overrides()


def test_the_header_states_the_cache_the_planner_counts():
    qwen = recommend(plan_config("model_spec=qwen3-next-80b-a3b", "hardware=[h100]"))[0]
    assert (
        "hybrid cache: KV 24,576 B (24.0 KiB) per token + 73.7 MiB of state per request, 121.7 MiB per prompt" in qwen
    )
    deepseek = recommend(plan_config("model_spec=deepseek-v3", "hardware=[h100]", "plan.max_devices=16"))[0]
    assert "mla cache: KV 70,272 B (68.6 KiB) per token, 137.2 MiB per prompt" in deepseek


def test_the_output_states_the_handoff_and_each_options_power_and_energy():
    lines = recommend(plan_config("hardware=[h100]", "efficiency.handoff=0.1"))
    assert lines[1].endswith("; KV handoff 0.100 of a split's prefill busy time")
    header = next(line for line in lines if line.startswith("mode "))
    assert header.split()[-5:] == ["W", "kWh/M", "KV", "GB/s", "bound"]
    # Eight H100s flat out: 5,600 W.
    colocated = next(line for line in lines if line.startswith("colocated "))
    assert " 5,600 " in colocated


def test_calibration_reproduces_the_bench_stage_rates():
    cfg = plan_config("model_spec=smollm2-135m", "hardware=[cpu-core]", "plan.max_batch=64")
    cpu = catalogue(cfg.hardware)[0]
    eff = Efficiency.from_bench(BENCH, cpu, cfg.model_spec, cfg.plan)
    # The catalogue's rough peaks are peaks: the measured rates stay below them.
    assert 0 < eff.prefill < 1 and 0 < eff.decode < 1
    # The handoff: 2.454 s in prefill and 3.327 s in decode, 2.61% of prefill's busy time.
    assert eff.handoff == 0.0261
    # The bench's disaggregated run: 320 rows, 52,208 prompt and 18,272 output tokens; prefill
    # busy 221.133 s (its prefill proper the rest of the handoff's share) and decode 177.018 s,
    # one worker on one core each.
    p = Planner(cfg.model_spec, Workload(52_208 / 320, 18_272 / 320, 320), eff, cfg.plan)
    assert p.prefill_rate(cpu) == pytest.approx(52_208 / (221.133 * (1 - 0.0261)))
    assert p.decode_rate(cpu) == pytest.approx(18_272 / 177.018)
    assert p.disaggregated(Pool(cpu, 1), Pool(cpu, 1)).output_tokens_per_s == pytest.approx(18_272 / 221.133)


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


def test_every_catalogue_entry_has_its_power():
    cfg = plan_config("hardware=[h100,a100,l4,a10g,cpu-core]")
    watts = {name: (hw.idle_watts, hw.busy_watts) for name, hw in cfg.hardware.items()}
    assert watts == {
        "h100": (80, 700),
        "a100": (55, 400),
        "l4": (18, 72),
        "a10g": (30, 300),
        "cpu-core": (3, 7),
    }
    p = Planner(cfg.model_spec, WORKLOAD, cfg.efficiency, cfg.plan)
    for hw in catalogue(cfg.hardware):
        [tp, *_] = p.engine_sizes(hw, 8)
        assert p.colocated(Pool(hw, 8, tp)).watts == 8 * hw.busy_watts


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
    assert re.search(r"\ndisaggregated +h100 -> l4 ", done.stdout) and "recommended:" in done.stdout
    assert re.search(r"\n  100,000 rows: [\d.]+ h, \$[\d,.]+, [\d,.]+ kWh\n", done.stdout)
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
