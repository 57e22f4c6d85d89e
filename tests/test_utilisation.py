"""What the report's utilisation and step-time rows are made of, against their definitions: step
and inter-token distributions, the model's FLOPs and bytes per request, its parameters counted
from the checkpoint, the devices' peaks, and a pool's shares of them."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from pipeline import cache
from pipeline.config import Device, EngineConfig
from pipeline.engine.family import CacheGeometry, Family
from pipeline.engine.steps import Histogram, StepClock
from pipeline.engine.weights import Weights, count_weights
from pipeline.engine.work import ModelWork
from pipeline.job.metrics import JobMetrics
from pipeline.job.peak import Peak, catalogue_entry, cpu_peak
from pipeline.job.report import report_lines
from pipeline.job.utilisation import pool_utilisation, utilisation
from tests.test_job_report import METRICS, stage


def histogram(values) -> Histogram:
    h = Histogram()
    for v in values:
        h.add(float(v))
    return h


def test_a_histogram_keeps_exact_moments_and_percentiles_within_its_bins():
    values = np.random.default_rng(0).lognormal(mean=-4, sigma=1, size=5000)
    spread = histogram(values).spread()
    assert spread.count == 5000 and spread.max == values.max()
    assert spread.mean == pytest.approx(values.mean()) and spread.stddev == pytest.approx(values.std())
    for q, got in ((50, spread.p50), (90, spread.p90), (99, spread.p99)):
        assert got == pytest.approx(np.percentile(values, q), rel=0.06)
    assert Histogram().spread() is None


def test_histograms_of_two_workers_add_up_to_one_of_all_their_steps():
    a, b = [0.01, 0.02, 0.5], [0.03, 0.04]
    both = histogram(a) + histogram(b)
    assert both == histogram(a + b)


def test_inter_token_times_start_at_a_requests_first_token_and_end_with_it():
    clock = StepClock()
    out = lambda rid, n=1, done=None: SimpleNamespace(request_id=rid, new_token_ids=[0] * n, finish_reason=done)  # noqa: E731
    clock.tokens([out("a"), out("b", 0)])  # a's first token; b still prefilling
    clock.tokens([out("a"), out("b")])  # a's second: one gap; b's first
    clock.tokens([out("a", done="stop"), out("b")])  # a's last, b's second
    clock.tokens([out("a"), out("b", done="length")])  # a finished: its clock was dropped
    assert clock.take().inter_token_seconds.count == 4  # a: 2, b: 2


# One layer of 2 KV heads and 4 query heads of 8 dims, 4-byte cache: 2 * 2 * 8 * 4 = 128 B a token.
WEIGHTS = Weights(params=1000, active_params=1000, lm_head_params=100, embedding_params=100)


def work(family: Family = Family.attention, window: int | None = None, state: int = 0) -> ModelWork:
    cache = CacheGeometry(
        family,
        layers=1,
        kv_heads=2,
        head_dim=8,
        dtype_bytes=4,
        window=window,
        state_layers=1 if state else 0,
        state_bytes_per_layer=state,
    )
    return ModelWork(weights=WEIGHTS, weight_bytes=4000, cache=cache, attention_width=1 * 4 * 8)


def test_a_requests_flops_count_its_computed_tokens_sampled_tokens_and_contexts():
    # Prompt 10, 4 cached, 3 generated: 6 prompt tokens and 2 fed-back ones computed at positions
    # 4..11, attending to 5..12 tokens (68 in all); 3 tokens sampled.
    flops = work().request_flops(prompt=10, cached=4, generated=3)
    assert flops == 2 * 800 * 8 + 2 * 100 * 3 + 4 * 32 * sum(range(5, 13))
    # A window of 6: the same positions see 5, 6, 6, ...
    assert work(Family.sliding, window=6).request_flops(10, 4, 3) == 2 * 800 * 8 + 2 * 100 * 3 + 4 * 32 * (5 + 6 * 7)


def test_a_requests_bytes_write_its_kv_read_the_prompt_once_and_the_context_per_decode_step():
    # 8 tokens computed (written), the 10-token prompt read once, decode steps at 11 and 12 tokens.
    assert work().request_bytes(prompt=10, cached=4, generated=3) == 128 * (8 + 10 + 11 + 12)
    # A recurrent state of 1000 B read and written at the prompt and each of 2 decode steps.
    assert work(Family.hybrid, state=1000).request_bytes(10, 4, 3) == 128 * (8 + 10 + 11 + 12) + 2 * 1000 * 3


def test_the_bundled_models_parameters_are_counted_from_its_checkpoint(model):
    weights = model.weights
    loaded = AutoModelForCausalLM.from_pretrained(model.path)
    assert weights.params == sum(p.numel() for p in loaded.parameters()) == 134_515_008
    # Tied embeddings: the head is multiplied per sampled token, no separate lookup table.
    assert (weights.lm_head_params, weights.embedding_params) == (49152 * 576, 0)
    assert model.query_heads == 9
    assert ModelWork.of(model).weight_bytes == weights.params * 4  # float32 on CPU


def test_an_moe_counts_its_experts_at_their_top_k_share(tmp_path):
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(10, 4),
            "model.layers.0.mlp.experts.0.w.weight": torch.zeros(4, 4),
            "model.layers.0.mlp.experts.1.w.weight": torch.zeros(4, 4),
            "model.layers.0.mlp.experts.2.w.weight": torch.zeros(4, 4),
            "model.layers.0.mlp.experts.3.w.weight": torch.zeros(4, 4),
        },
        tmp_path / "model.safetensors",
    )
    config = SimpleNamespace(
        vocab_size=10, hidden_size=4, tie_word_embeddings=True, num_experts_per_tok=1, num_experts=4
    )
    weights = count_weights(str(tmp_path), config)
    assert (weights.params, weights.active_params) == (40 + 64, 40 + 16)
    assert count_weights(str(tmp_path / "absent"), config) is None


def test_a_gpu_is_found_in_the_catalogue_by_a_word_of_its_name():
    assert catalogue_entry("NVIDIA H100 80GB HBM3")["tflops"] == 989
    assert catalogue_entry("NVIDIA A10G")["mem_bw_gbs"] == 600
    assert catalogue_entry("NVIDIA L40S") is None  # not L4


def test_the_cpu_peak_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    peak = cpu_peak("float32")
    assert 1e9 < peak.flops_per_core < 1e13 and 1e8 < peak.bytes_per_core <= peak.bytes_all_cores < 1e12
    (cached,) = (tmp_path / "peaks").iterdir()
    cached.write_text(json.dumps({"flops_per_core": 1.0, "bytes_per_core": 2.0, "bytes_all_cores": 3.0}))
    assert cpu_peak("float32").of(cores=2) == Peak(flops_per_s=2.0, bytes_per_s=3.0)  # read, not measured again


def engine_pool(flops: float, traffic: float, busy: float = 10.0) -> dict:
    return {
        **stage(busy, 10, 1000, 100, 1),
        "model_flops": flops,
        "memory_bytes": traffic,
        "engine_steps": 50,
        "per_worker": [{**stage(busy, 10, 1000, 100, 1)["per_worker"][0], "device": "NVIDIA H100 80GB HBM3"}],
    }


def test_utilisation_is_the_work_per_busy_second_against_the_peak():
    pool = JobMetrics.from_dict({**METRICS, "stages": {"decode": engine_pool(flops=2e14, traffic=5e12)}}).stages[
        "decode"
    ]
    u = utilisation(pool, Peak(flops_per_s=1e14, bytes_per_s=1e12), "gpu")
    assert (u.flops_per_s, u.bytes_per_s) == (2e13, 5e11)  # FLOP/s and bytes/s, over 10 busy seconds
    assert (u.compute_share, u.bandwidth_share) == (0.2, 0.5)
    assert u.intensity == 2e14 / 5e12 == 40 and u.ridge == 100  # below the ridge: bandwidth-bound
    on_h100 = pool_utilisation(pool, EngineConfig(device=Device.cuda), "bfloat16")
    assert on_h100.peak_flops_per_s == 989e12 and 0 < on_h100.compute_share < on_h100.bandwidth_share <= 1
    assert (
        pool_utilisation(pool, EngineConfig(device=Device.cuda, tensor_parallel_size=2), "bfloat16").peak_bytes_per_s
        == 2 * 3350e9
    )
    unknown = utilisation(pool, None, "NVIDIA B300")
    assert unknown.compute_share is None and unknown.flops_per_s == 2e13


def test_the_report_shows_each_engine_pools_utilisation_and_step_times():
    spread = {"count": 50, "mean": 0.02, "stddev": 0.005, "p50": 0.02, "p90": 0.025, "p99": 0.05, "max": 0.06}
    pool = {**engine_pool(2e14, 5e12), "step_seconds": spread, "inter_token_seconds": spread}
    metrics = JobMetrics.from_dict({**METRICS, "stages": {"decode": pool}})
    metrics.stages["decode"].utilisation = utilisation(metrics.stages["decode"], Peak(1e14, 1e12), "gpu")
    lines = report_lines(metrics, plotted=False)
    assert "| decode | gpu | 20,000.0 | 20% | 500.00 | 50% | 40 | 100 |" in lines
    assert "| decode | 50 | 20.0 | 25.0 | 50.0 | 5.0 | 20.0 | 25.0 | 50.0 | 5.0 |" in lines
