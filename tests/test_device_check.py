"""The device check (jobs/device_check.py) on CPU tensors: it runs the connector's save and load
path through every layout and codec exactly, its cache views are the ones vLLM allocates, and
the prefill time it compares stalls with is the planner's."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from vllm.v1.kv_cache_layout import KVCacheLayout

from pipeline.bench.device_check import (
    H100_PREFILL_TOKENS_PER_S,
    LAYOUTS,
    Geometry,
    paged_views,
    run,
    summary,
    write,
)
from pipeline.kv.codec import CODECS
from pipeline.plan.roofline import Efficiency, Hardware, ModelSpec, Planner, PlanSettings, Workload
from tests.test_layout import BLOCK, HEADS, LAYERS, NUM_BLOCKS, vllm_caches


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_views_are_the_ones_vllm_allocates(layout):
    assert LAYOUTS[layout] == KVCacheLayout[layout].value
    ours = paged_views(Geometry(LAYERS, HEADS, 64, "bfloat16", BLOCK), layout, NUM_BLOCKS, torch.device("cpu"))
    theirs = vllm_caches(KVCacheLayout[layout], torch.bfloat16, 64, BLOCK)
    assert [(v.shape, v.stride(), v.dtype) for v in ours] == [(v.shape, v.stride(), v.dtype) for v in theirs]


def test_the_prefill_time_compared_with_is_the_planners():
    model = ModelSpec(**OmegaConf.load("conf/model_spec/llama-3.1-8b.yaml"))
    h100 = Hardware(name="h100", **OmegaConf.load("conf/hardware/h100.yaml")["h100"])
    planner = Planner(model, Workload(1024, 1, 1), Efficiency(), PlanSettings())
    assert planner.prefill_rate(h100) == pytest.approx(H100_PREFILL_TOKENS_PER_S)


def test_every_layout_and_codec_round_trips_through_the_copies(tmp_path):
    geometry = Geometry(layers=2, kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
    report = run(torch.device("cpu"), geometry, prompts=(20, 48), codecs=tuple(CODECS), repeats=1)
    results = report["results"]
    assert {(r["layout"], r["tokens"], r["codec"]) for r in results} == {
        (layout, tokens, c) for layout in LAYOUTS for tokens in (20, 48) for c in CODECS
    }
    assert all(r["exact"] for r in results)
    raw = next(r for r in results if r["codec"] == "none" and r["tokens"] == 48)
    assert raw["bytes"] == 2 * 2 * 48 * 2 * 64 * 2  # layers, K/V, tokens, heads, head_dim, bf16
    assert all(r["save_stall_ms"] > 0 and r["load_handoff_gbs"] > 0 for r in results)
    assert "LBNHC" in summary(report)
    write(report, tmp_path / "device_check.json")
    assert json.loads((tmp_path / "device_check.json").read_text()) == report
