"""What a model keeps per request, by family, and what it costs: the one place that knows each
cache's geometry and bytes (resolve_model, the payload's checks, the planner and the KV bench
read it from here).

- attention: keys and values per layer, KV head and token (MHA, GQA; also sliding-window layers
  beside full ones, Gemma 2/3, which keep every token's KV with a KV connector).
- mla: one compressed latent per layer and token (DeepSeek-V2/V3, Kimi K2): kv_lora_rank +
  qk_rope_head_dim values, no heads.
- sliding: every layer attends over a window (Mistral 7B v0.1): a request keeps, and the split
  moves, the KV of its last `window` tokens only.
- hybrid: attention layers' KV per token plus, per recurrent layer (Mamba-1 and -2, Gated
  DeltaNet), a state of fixed size per request, whatever the prompt's length (Falcon-H1, Granite
  4.0-H, Nemotron-H, Qwen3-Next, Jamba; Mamba models, with no attention layers at all).

The state formulas follow vLLM's own (model_executor/layers/mamba/mamba_utils.py, at tensor
parallel size 1), read from the Hugging Face config so that the driver need not import vLLM. The
conv state is in the model's dtype; the SSM (recurrent) state in its own, float32 unless the job
says otherwise (pipeline/engine/build.py sets it, since vLLM's default differs by platform).
"""

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Family(str, Enum):
    attention = "attention"
    mla = "mla"
    sliding = "sliding"
    hybrid = "hybrid"


@dataclass(frozen=True)
class CacheGeometry:
    """A model's per-request cache. Token-indexed layers hold [parts, tokens, heads, head_dim]
    (parts 2: key and value; 1: an MLA latent, heads 1); recurrent layers hold
    `state_bytes_per_layer` each, however long the prompt."""

    family: Family
    layers: int  # layers whose cache grows with the tokens
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    window: int | None = None  # sliding: the tokens a request keeps
    state_layers: int = 0
    state_bytes_per_layer: int = 0
    recurrent: str | None = None  # the recurrent layers' kind: mamba1, mamba2, gated_delta_net
    # Why kvrelay cannot move it (None: it can); a colocated job still runs it.
    unmovable: str | None = None

    @property
    def parts(self) -> int:
        return 1 if self.family is Family.mla else 2

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.parts * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def state_bytes(self) -> int:
        """Recurrent state per request."""
        return self.state_layers * self.state_bytes_per_layer

    def carried(self, prompt_tokens: int) -> tuple[int, int]:
        """The tokens [first, stop) of a prompt whose KV the split moves: all of them; those of
        its window (sliding); with recurrent layers, all but the last, since a state cannot be
        rewound to before the token decode computes again (prefill stops short of it)."""
        if self.state_layers:
            return 0, max(prompt_tokens - 1, 0)
        if self.window:
            return max(prompt_tokens - self.window, 0), prompt_tokens
        return 0, prompt_tokens

    def request_bytes(self, prompt_tokens: int) -> int:
        """What the split moves for a prompt of `prompt_tokens` (before any codec), and about
        what a request of that length keeps in the engine."""
        first, stop = self.carried(prompt_tokens)
        return (stop - first) * self.bytes_per_token + self.state_bytes

    def token_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """The canonical layout of `tokens` tokens' KV: [layers, parts, tokens, heads, head_dim]."""
        return (self.layers, self.parts, tokens, self.kv_heads, self.head_dim)


def geometry(
    name: str, text: "PretrainedConfig", dtype_bytes: int, max_model_len: int, ssm_dtype_bytes: int = 4
) -> CacheGeometry:
    """The cache of a model from its (language) config; `name` names it in refusals."""
    model_type = text.model_type
    if getattr(text, "kv_lora_rank", None):
        return CacheGeometry(
            Family.mla,
            layers=text.num_hidden_layers,
            kv_heads=1,
            head_dim=text.kv_lora_rank + text.qk_rope_head_dim,
            dtype_bytes=dtype_bytes,
        )
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = (getattr(text, "head_dim", None) or text.hidden_size // heads) if heads else 0
    kinds = layer_kinds(text)
    recurrent = [k for k in kinds if k not in ATTENTION]
    if recurrent or model_type in STATE or not heads:
        kind, state = STATE.get(model_type, (None, None))
        # A "hybrid" layer (Falcon-H1) runs attention and Mamba side by side.
        attention = sum(k in ATTENTION or k == "hybrid" for k in kinds) if kinds else 0
        unmovable = None
        if state is None:
            unmovable = (
                f"model '{name}' ({model_type}) has {', '.join(sorted(set(recurrent))) or 'state-space'} layers "
                "whose state kvrelay does not know how to size: the KV handoff cannot move it; use mode=colocated"
            )
        return CacheGeometry(
            Family.hybrid,
            layers=attention,
            kv_heads=kv_heads if attention else 0,
            head_dim=head_dim if attention else 0,
            dtype_bytes=dtype_bytes,
            state_layers=len(recurrent) if kinds else text.num_hidden_layers,
            state_bytes_per_layer=_state_bytes(state(text), dtype_bytes, ssm_dtype_bytes) if state else 0,
            recurrent=kind,
            unmovable=unmovable,
        )
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    all_sliding = window and (set(kinds) <= {"sliding_attention"}) and max_model_len > window
    return CacheGeometry(
        Family.sliding if all_sliding else Family.attention,
        layers=text.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype_bytes=dtype_bytes,
        window=window if all_sliding else None,
    )


ATTENTION = {"full_attention", "sliding_attention", "attention"}


def layer_kinds(text: "PretrainedConfig") -> list[str]:
    """Per layer its kind, where the config says: attention ones, or "mamba",
    "linear_attention" and the like. Nemotron-H writes them as a pattern: M Mamba, * attention,
    - MLP, E MoE."""
    pattern = getattr(text, "hybrid_override_pattern", None)
    if pattern:
        return [{"M": "mamba", "*": "attention"}[c] for c in pattern if c in "M*"]
    return list(getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None) or ())


def _state_bytes(elements: tuple[int, int], dtype_bytes: int, ssm_dtype_bytes: int) -> int:
    conv, ssm = elements
    return conv * dtype_bytes + ssm * ssm_dtype_bytes


def _mamba2(text: "PretrainedConfig", *, inner: int, groups: int, heads: int, head: int) -> tuple[int, int]:
    """Conv state (kernel - 1) x (inner + 2 groups x state) and SSM state heads x head x state."""
    state = _first(text, "mamba_d_state", "ssm_state_size", "state_size")
    kernel = _first(text, "mamba_d_conv", "conv_kernel")
    return (kernel - 1) * (inner + 2 * groups * state), heads * head * state


def _first(text: "PretrainedConfig", *names: str) -> int:
    return next(getattr(text, n) for n in names if getattr(text, n, None) is not None)


def _falcon_h1(text: "PretrainedConfig") -> tuple[int, int]:
    inner = text.mamba_d_ssm or int(text.mamba_expand * text.hidden_size)
    return _mamba2(text, inner=inner, groups=text.mamba_n_groups, heads=text.mamba_n_heads, head=text.mamba_d_head)


def _granite_hybrid(text: "PretrainedConfig") -> tuple[int, int]:
    inner = text.mamba_expand * text.hidden_size
    return _mamba2(text, inner=inner, groups=text.mamba_n_groups, heads=text.mamba_n_heads, head=text.mamba_d_head)


def _nemotron_h(text: "PretrainedConfig") -> tuple[int, int]:
    inner = text.mamba_num_heads * text.mamba_head_dim
    return _mamba2(text, inner=inner, groups=text.n_groups, heads=text.mamba_num_heads, head=text.mamba_head_dim)


def _mamba2_only(text: "PretrainedConfig") -> tuple[int, int]:
    """A state-space model of Mamba-2 layers alone (Mamba-Codestral)."""
    inner = text.expand * text.hidden_size
    return _mamba2(text, inner=inner, groups=text.n_groups, heads=text.num_heads, head=text.head_dim)


def _gated_delta_net(text: "PretrainedConfig") -> tuple[int, int]:
    """Conv state (kernel - 1) x (2 key dims + value dims), recurrent state v heads x v dim x k dim."""
    k, v = (
        text.linear_num_key_heads * text.linear_key_head_dim,
        text.linear_num_value_heads * text.linear_value_head_dim,
    )
    recurrent = text.linear_num_value_heads * text.linear_value_head_dim * text.linear_key_head_dim
    return (text.linear_conv_kernel_dim - 1) * (2 * k + v), recurrent


def _mamba1(inner: int, state: int, kernel: int) -> tuple[int, int]:
    """Mamba-1: conv state (kernel - 1) x inner, SSM state inner x state."""
    return (kernel - 1) * inner, inner * state


def _jamba(text: "PretrainedConfig") -> tuple[int, int]:
    return _mamba1(text.mamba_expand * text.hidden_size, text.mamba_d_state, text.mamba_d_conv)


def _mamba1_only(text: "PretrainedConfig") -> tuple[int, int]:
    return _mamba1(text.intermediate_size, text.state_size, text.conv_kernel)


# model_type -> its recurrent layers' kind, and the state elements of one per request:
# (conv state, SSM state).
STATE: dict[str, tuple[str, Callable[["PretrainedConfig"], tuple[int, int]]]] = {
    "falcon_h1": ("mamba2", _falcon_h1),
    "granitemoehybrid": ("mamba2", _granite_hybrid),
    "bamba": ("mamba2", _granite_hybrid),
    "nemotron_h": ("mamba2", _nemotron_h),
    "qwen3_next": ("gated_delta_net", _gated_delta_net),
    "jamba": ("mamba1", _jamba),
    "mamba2": ("mamba2", _mamba2_only),
    "mamba": ("mamba1", _mamba1_only),
}
