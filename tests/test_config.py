import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.config import Mode
from pipeline.errors import JobError
from pipeline.job import check_tensor_parallel
from tests.conftest import job_config


def test_defaults_compose_to_the_disaggregated_job():
    cfg = job_config()
    assert cfg.mode is Mode.disaggregated
    assert cfg.model.bundled_gguf.endswith(".gguf")
    assert cfg.sampling.temperature == 0.0


def test_mode_and_sampling_overrides():
    cfg = job_config("mode=colocated", "sampling.max_tokens=7", "sampling.seed=3", "pools.decode.size=2")
    assert (cfg.mode, cfg.sampling.max_tokens, cfg.sampling.seed, cfg.pools.decode.size) == (Mode.colocated, 7, 3, 2)


def test_engine_pools_hold_enough_batches_to_stay_full():
    """While a finished batch is replaced, the others in hand fill the engine's sequences."""
    pools = job_config().pools
    for pool in (pools.prefill, pools.decode, pools.colocated):
        assert (pool.concurrent_batches - 1) * pool.batch_size >= pool.max_num_seqs
    assert pools.tokenize.concurrent_batches == pools.detokenize.concurrent_batches == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.max_tokens=many", "max_tokens"),
        ("pools.prefill.sizes=2", "sizes"),
        ("mode=sideways", "mode/sideways"),
        ("model=nonexistent", "model/nonexistent"),
    ],
)
def test_bad_override_fails_before_any_work_naming_the_key(override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        job_config(override)
    assert message in str(error.value) or message in str(error.value.__cause__)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.tensor_parallel_size=2"], "engine.tensor_parallel_size=2 needs mode=colocated: the KV handoff"),
        (["mode=colocated", "engine.tensor_parallel_size=2"], "needs engine.device=cuda and pools.colocated.num_gpus=2"),
        (["mode=colocated", "engine.tensor_parallel_size=4", "engine.device=cuda", "pools.colocated.num_gpus=2"],
         "pools.colocated.num_gpus=4 (each worker holds its engine's GPUs; it has 2)"),
    ],
)  # fmt: skip
def test_tensor_parallel_engines_need_their_gpus_and_no_kv_handoff(overrides, message):
    with pytest.raises(JobError, match=re.escape(message)):
        check_tensor_parallel(job_config(*overrides))
    check_tensor_parallel(job_config("mode=colocated", "engine.tensor_parallel_size=2", "engine.device=cuda",
                                     "pools.colocated.num_gpus=2"))  # fmt: skip
