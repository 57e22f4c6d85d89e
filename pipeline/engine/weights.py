"""A model's parameters, counted from its checkpoint's safetensors headers (no tensor is read):
what the utilisation of an engine pool (pipeline/engine/work.py) and the planner's model
(jobs.advise) are computed from."""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The config keys that give an MoE's experts: per token, and in all.
EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_top_k", "num_selected_experts")
EXPERTS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")


@dataclass(frozen=True)
class Weights:
    params: int  # every parameter the checkpoint stores (tied embeddings once)
    active_params: float  # those a token is multiplied with: an MoE's experts at their top-k share
    lm_head_params: int  # vocab x hidden: multiplied once per sampled token, not per token computed
    embedding_params: int  # the input embedding: looked up, never multiplied (0 where tied to the head)

    @property
    def body_params(self) -> float:
        """What every computed token is multiplied with."""
        return self.active_params - self.lm_head_params - self.embedding_params


def count_weights(path: str, text_config: "PretrainedConfig") -> Optional[Weights]:
    """The checkpoint's parameters in a local folder; None where it holds no safetensors (a hub
    id not downloaded yet, another format): utilisation is then not reported."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    shapes = {name: shape for f in files for name, shape in _tensor_shapes(f).items()}
    count = lambda names: sum(math.prod(shapes[n]) for n in names)  # noqa: E731
    params = count(shapes)
    experts = count(n for n in shapes if ".experts." in n)
    per_token, total = _config_int(text_config, EXPERTS_PER_TOKEN), _config_int(text_config, EXPERTS)
    share = per_token / total if experts and per_token and total else 1.0
    head = text_config.vocab_size * text_config.hidden_size
    tied = getattr(text_config, "tie_word_embeddings", False)
    return Weights(
        params=params,
        active_params=params - experts * (1 - share),
        lm_head_params=head,
        embedding_params=0 if tied else head,
    )


def _tensor_shapes(file: Path) -> dict[str, list[int]]:
    """A safetensors file's header: 8 bytes of length, then JSON naming each tensor's shape."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def _config_int(config: "PretrainedConfig", keys: tuple[str, ...]) -> Optional[int]:
    return next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)), None)
