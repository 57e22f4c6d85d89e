"""Tiny LoRA adapters in PEFT's format (adapter_config.json, adapter_model.safetensors) for a
Llama-style checkpoint: random, seeded A and B on the attention's q_proj and v_proj of every
layer. Both factors are non-zero (PEFT starts B at zero, an adapter that changes nothing), and
large enough that an adapter's greedy tokens leave the base model's within a few tokens."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 8
ALPHA = 16
SCALE = 0.08  # of each factor's entries


def build(checkpoint: str | Path, folder: Path, seed: int, rank: int = RANK) -> Path:
    """An adapter for `checkpoint` in `folder`, the same bytes for the same seed."""
    config = json.loads(Path(checkpoint, "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    outputs = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head_dim}
    draw = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in outputs.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=draw) * SCALE
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=draw) * SCALE
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": ALPHA,
        "target_modules": list(outputs),
        "bias": "none",
        "base_model_name_or_path": str(checkpoint),
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft, indent=2))
    return folder
