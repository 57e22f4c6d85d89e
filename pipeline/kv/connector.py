"""vLLM KV connector that hands whole-prompt KV caches to and from the calling process,
through `pipeline.kv.handoff` (the engine runs in the stage actor's own process: in-process
engine core, uni executor).

Producer: saves a request's prompt KV after the step that completes its prefill (the last
chunk of a chunked prefill), from the token the request names (the blocks before it are shared
blocks stored already, pipeline/kv/blocks.py, or outside a sliding window), and the recurrent
layers' state as of that step. Consumer: reports all but the last prompt token as external, so
the engine recomputes that one token to get logits, and writes the offered KV (and state) into
the request's blocks before the forward pass: again each time the engine resumes a request it
preempted (vLLM frees a preempted request's blocks and asks the connector anew). A state cannot
be rewound, so the producer of a model with recurrent layers is given the prompt without its
last token (pipeline/stages/prefill.py). A preempted producer request computes its prompt again
(less what the prefix cache still holds) and is saved after its last chunk, once: it never runs
again after that step (max_tokens=1).

Block ids come per KV cache group (`SupportsHMA`): models with recurrent layers run with vLLM's
hybrid KV cache manager; every other model with one group (pipeline/engine/build.py).

Worker side, saves are gathered and encoded on the engine's stream and copied to host memory
beside it, loads copied to the device beside it (pipeline/kv/transfer.py); the paged cache is read
through `EngineCache` (pipeline/kv/engine_cache.py).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from pipeline.kv import handoff, transfer
from pipeline.kv.codec import codec
from pipeline.kv.engine_cache import BlockIds, EngineCache

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


def _key(request: "Request") -> str | None:
    return (request.kv_transfer_params or {}).get(handoff.KEY)


def _copied(block_ids: tuple[list[int], ...]) -> BlockIds:
    """The request's block ids per group as they stand (the manager's lists change as it runs)."""
    return tuple(list(ids) for ids in block_ids)


@dataclass
class _Transfer:
    key: str
    block_ids: BlockIds
    start: int
    stop: int


@dataclass
class RelayMetadata(KVConnectorMetadata):
    saves: list[_Transfer] = field(default_factory=list)
    loads: list[_Transfer] = field(default_factory=list)


class KVRelayConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._producer = self._kv_transfer_config.is_kv_producer
        # Scheduler side.
        # Producer: req id -> (key, first token to save, prompt tokens).
        self._saves: dict[str, tuple[str, int, int]] = {}
        self._pending_loads: list[_Transfer] = []
        # Worker side.
        extra = self._kv_transfer_config.get_from_extra_config
        self._codec = codec(extra("codec", "none"), int(extra("block_tokens", 0)))
        self._buffer_limits = int(extra("pinned_buffer_bytes", 0)), int(extra("device_buffer_bytes", 0))
        self._state_bytes_per_layer = int(extra("state_bytes_per_layer", 0))
        self._cache: EngineCache | None = None
        self._copies: transfer.DeviceCopies | None = None

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        key = _key(request)
        if key is None:
            return 0, False
        if self._producer:
            save_from = request.kv_transfer_params.get(handoff.SAVE_FROM, 0)
            self._saves[request.request_id] = (key, save_from, request.num_prompt_tokens)
            return 0, False
        return max(request.num_prompt_tokens - 1 - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens == 0 or self._producer:
            return
        stop = request.num_prompt_tokens - 1
        self._pending_loads.append(
            _Transfer(_key(request), _copied(blocks.get_block_ids()), stop - num_external_tokens, stop)
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = RelayMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if not self._producer:
            return meta
        progress = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        progress.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, computed in progress.items():
            if req_id not in self._saves:
                continue
            key, save_from, prompt_len = self._saves[req_id]
            if computed < prompt_len <= computed + scheduler_output.num_scheduled_tokens[req_id]:
                block_ids = _copied(self._kv_cache_manager.get_block_ids(req_id))
                meta.saves.append(_Transfer(key, block_ids, save_from, prompt_len))
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._saves.pop(request.request_id, None)
        # Every request ends here once, with every time it was preempted counted (vLLM's own
        # count is kept only with stats on).
        handoff.preemptions.add(request.num_preemptions)
        return False, None

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, [])

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._cache = EngineCache(kv_caches, self._kv_cache_config, self._vllm_config, self._state_bytes_per_layer)
        self._copies = transfer.copies_for(next(iter(kv_caches.values())).device, *self._buffer_limits)
        handoff.copies = self._copies

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for load in meta.loads:
            with handoff.timed():
                kv, offset, state = handoff.offered(load.key).to_device(load.start)
                self._cache.scatter(load.block_ids, kv, load.start, load.stop, offset)
                if state is not None:
                    self._cache.state.write(load.block_ids, state)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        # Runs after the forward pass has written every layer of this step.
        meta = self._get_connector_metadata()
        for save in meta.saves:
            with handoff.timed():
                kv = self._cache.gather(save.block_ids, save.start, save.stop)
                state = self._cache.state.read(save.block_ids)
                handoff.save(save.key, transfer.download(kv, self._codec, self._copies, state))
