"""What an engine's work costs in FLOPs and memory bytes, from the model's shape: the numerators
of a pool's utilisation (pipeline/job/utilisation.py). A roofline estimate, like the planner's:

- FLOPs: 2 per parameter per token computed (an MoE's active ones), the LM head once per token
  sampled (vLLM computes logits only there), and attention's 4 per query head and head dim per
  context token a computed token attends to (within the window, where there is one).
- Bytes: each engine step reads every weight once (counted per step by the engine loop); per
  request, its KV written once per token computed, read once for the prompt and at each decode
  step over its context so far, and a hybrid's recurrent state read and written per step.
  Activations are left out: far fewer bytes than the weights at these batch sizes.

A request is counted from what its engine reports: prompt tokens, those the engine had cached
(prefix cache hits, or KV loaded through the connector) and tokens generated."""

from dataclasses import dataclass
from typing import Optional

from pipeline.engine.family import CacheGeometry
from pipeline.engine.model import ResolvedModel, dtype_bytes
from pipeline.engine.weights import Weights


@dataclass(frozen=True)
class ModelWork:
    weights: Weights
    weight_bytes: float  # read by every engine step
    cache: CacheGeometry
    attention_width: int  # attention layers x query heads x head dim

    @classmethod
    def of(cls, model: ResolvedModel) -> Optional["ModelWork"]:
        """None where the checkpoint's weights could not be counted."""
        if model.weights is None:
            return None
        return cls(
            weights=model.weights,
            weight_bytes=model.weights.params * dtype_bytes(model.dtype),
            cache=model.cache,
            attention_width=model.cache.layers * model.query_heads * model.cache.head_dim,
        )

    def request_flops(self, prompt: int, cached: int, generated: int) -> float:
        """FLOPs of one request: its prompt from `cached` on, and `generated` tokens sampled (the
        last one never fed back)."""
        decoded = max(generated - 1, 0)
        computed = max(prompt - cached, 0) + decoded
        contexts = self._contexts(cached, prompt + decoded)
        return (
            2 * self.weights.body_params * computed
            + 2 * self.weights.lm_head_params * generated
            + 4 * self.attention_width * contexts
        )

    def request_bytes(self, prompt: int, cached: int, generated: int) -> float:
        """Cache bytes one request moves in and out of memory (weights are counted per step)."""
        decoded = max(generated - 1, 0)
        computed = max(prompt - cached, 0) + decoded
        kv = self.cache.bytes_per_token * (computed + min(prompt, self.cache.window or prompt))
        kv += self.cache.bytes_per_token * self._contexts(prompt, prompt + decoded)
        return kv + 2 * self.cache.state_bytes * (1 + decoded)

    def _contexts(self, first: int, stop: int) -> int:
        """Tokens attended to by the tokens at positions [first, stop): each sees itself and
        those before it, the last `window` of them where there is a window."""
        window = self.cache.window or stop
        growing = min(stop, window)  # positions below the window see i + 1 tokens, the rest `window`
        seen = (growing * (growing + 1) - first * (first + 1)) // 2 if first < growing else 0
        return seen + window * max(stop - max(first, window), 0)
