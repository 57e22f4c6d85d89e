import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pipeline.config import Mode, Phase
from pipeline.engine.build import gpu_memory_utilization
from pipeline.errors import JobError
from pipeline.job.graph import block_rows, build_stages
from pipeline.job.validate import check_job
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


GPU_EACH = ["pools.prefill.num_gpus=1", "pools.decode.num_gpus=1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["kv.transport=storage"], "kv.transport=storage needs kv.storage_path"),
        (["kv.device_buffer_gib=-1"], "kv.device_buffer_gib must be 0 or more, not -1"),
        (["+engine.extra.dtype=half"], "engine.extra.dtype is kvrelay's to set: use model.dtype"),
        (["sampling.temperature=-1"], "sampling.temperature must be in [0, inf], not -1"),
        (["sampling.json_schema='{'"], "sampling.json_schema is not JSON text or a mapping"),
        (["sampling.json_schema={type: 5}"], "sampling.json_schema is not a valid JSON schema"),
        (["sampling.regex='(a'"], "sampling.regex is not a regular expression"),
        (["sampling.regex=a", "sampling.choice=[b]"], "sampling.at most one of json_schema, regex, choice"),
        (["sampling.min_tokens=9", "sampling.max_tokens=8"], "sampling.min_tokens (9) must not exceed max_tokens (8)"),
        (["input.apply_chat_template=false", "input.system_prompt=x"], "input.system_prompt needs the chat template"),
        (["+engine.extra.kv_cache_dtype=fp8"], "engine.extra.kv_cache_dtype=fp8 needs mode=colocated"),
        (["engine.tensor_parallel_size=2"], "engine.tensor_parallel_size=2 needs mode=colocated: the KV handoff"),
        (
            ["mode=colocated", "engine.tensor_parallel_size=2"],
            "needs engine.device=cuda and pools.colocated.num_gpus=2",
        ),
        (
            ["mode=colocated", "engine.tensor_parallel_size=4", "engine.device=cuda", "pools.colocated.num_gpus=2"],
            "pools.colocated.num_gpus=4 (each worker holds its engine's GPUs; it has 2)",
        ),
        (
            ["model.checkpoint=/models/x"],
            "model 'smollm2-135m': set exactly one of model.bundled_gguf and model.checkpoint",
        ),
        (
            ["input.format=openai_batch", "input.messages_column=turns"],
            "input.format=openai_batch takes its columns from the requests: drop input.messages_column",
        ),
        (
            ["input.format=openai_batch", "phase=decode", "mode=disaggregated"],
            "a decode job reads a prefill dataset (Parquet): drop input.format=openai_batch",
        ),
        (["cluster=existing", "cluster.address=null"], "cluster=existing needs cluster.address"),
        (["cluster.address=ray://head:10001"], "use cluster=existing cluster.address=..."),
        (["cluster.kind=local_hetero"], "cluster=local-hetero needs cluster.nodes"),
        (["output.path=/data/in/out"], "output.path /data/in/out and input.path /data/in overlap"),
        (["output.path=memory://out"], "output.path memory://out is in this process's memory"),
        (["engine.device=cuda"], "engine.device=cuda needs a GPU for each engine: pools.prefill.num_gpus is 0"),
        (["pools.decode.num_gpus=1"], "pools.decode.num_gpus=1 reserves GPUs that engine.device=cpu never uses"),
        (
            ["engine.device=cuda", "pools.prefill.num_gpus=2", "pools.decode.num_gpus=1"],
            "pools.prefill.num_gpus=2 holds GPUs its engine never uses (engine.tensor_parallel_size=1: one GPU each)",
        ),
        (
            ["engine.device=cuda", *GPU_EACH, "pools.decode.num_gpus=0.5", "+pools.decode.gpu_memory_utilization=0.9"],
            "pools.decode.gpu_memory_utilization=0.9 on num_gpus=0.5: engines sharing a GPU would claim more",
        ),
    ],
)
def test_a_job_refuses_before_any_work(overrides, message):
    with pytest.raises(JobError, match=re.escape(message)):
        check_job(job_config("input.path=/data/in", "output.path=/data/out", *overrides))


def test_each_refusal_has_its_way_out():
    check_job(job_config("input.path=/data/in", "output.path=/data/out"))
    check_job(job_config("input.path=/data/in", "output.path=/data/out", "engine.device=cuda", *GPU_EACH))
    # Two engines on one GPU: each claims its share of the engine-wide 0.9 unless told otherwise.
    shared = ["engine.device=cuda", "pools.prefill.num_gpus=0.5", "pools.decode.num_gpus=0.5"]
    cfg = job_config("input.path=/data/in", "output.path=/data/out", *shared)
    check_job(cfg)
    assert gpu_memory_utilization(cfg.engine, cfg.pools.decode) == pytest.approx(0.45)
    assert gpu_memory_utilization(cfg.engine, cfg.pools.colocated) == 0.9  # a whole GPU, or none
    check_job(
        job_config(
            "input.path=/data/in",
            "output.path=/data/out",
            "mode=colocated",
            "engine.tensor_parallel_size=2",
            "engine.device=cuda",
            "pools.colocated.num_gpus=2",
        )
    )
    halves = job_config("input.path=/data/in", "output.path=/data/out", "mode=colocated")
    halves.phase = Phase.prefill  # set by jobs.prefill, not a config key
    with pytest.raises(JobError, match="a prefill job is one half of mode=disaggregated"):
        check_job(halves)


def _blocks(rows: int, *overrides: str, row_bytes: float = 100, kv_row_bytes: float = 0) -> int:
    cfg = job_config(*overrides)
    return block_rows(rows, build_stages(cfg, None, [], "sink", None), row_bytes, kv_row_bytes)


def test_blocks_are_large_where_rows_are_cheap_and_spread_over_the_engines():
    assert _blocks(200_000, "mode=colocated", row_bytes=2048) == 16_384  # 32 MiB: Ray Data's cost is per block
    assert _blocks(200_000, "mode=colocated") == 50_000  # 4 blocks for the one engine worker
    assert _blocks(320, "mode=colocated") == 80
    assert _blocks(320) == 40  # two engine workers, prefill and decode
    assert _blocks(320, "pools.decode.size=3") == 32  # never fewer than an engine batch
    assert _blocks(23, "mode=colocated", "pools.colocated.batch_size=4") == 6


def test_blocks_that_carry_kv_stay_within_ray_datas_block_size():
    assert _blocks(200_000, kv_row_bytes=1 << 20) == 128  # 128 MiB of KV
    assert _blocks(200_000, kv_row_bytes=46_080 * 1000) == 32  # long prompts: an engine batch


@pytest.mark.slow
def test_engine_extra_reaches_vllms_engine_arguments(model):
    """vLLM itself judges what engine.extra passes: here a batch budget below the batch."""
    from pipeline.engine.build import build_engine

    cfg = job_config("+engine.extra.max_num_batched_tokens=3")
    with pytest.raises(Exception, match=re.escape("max_num_batched_tokens (3) must be greater than or equal")):
        build_engine(model, cfg.engine, cfg.pools.colocated)
