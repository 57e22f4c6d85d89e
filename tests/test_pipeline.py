"""End to end on the real engine and model: the disaggregated pipeline generates exactly what
the colocated one does, because the decode pool really uses the prefill pool's KV."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoTokenizer

from jobs.sample import SENTENCES
from pipeline.columns import with_columns
from pipeline.io import PromptSource, read_output
from pipeline.job import build, plan, run
from pipeline.kv import payload
from pipeline.metrics import start_sink
from tests.conftest import job_config

pytestmark = pytest.mark.slow

# Around every multiple of the plausible block sizes (16..128): below, at, one past.
LENGTHS = sorted(
    {1, 2, 3, 4, 5, 8, 12, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 90, 100, 127, 128, 129, 150, 191, 192, 193, 230,
     255, 256, 257, 300, 383, 384, 385, 420, 450, 511, 512, 513, 560, 600, 639, 640, 641, 660, 680, 699, 700, 701}
)  # fmt: skip
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(model, tmp_path_factory):
    """Natural-text prompts cut to exact token lengths, as token ids."""
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    text = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(7 * len(SENTENCES)))
    tokens = tokenizer(text).input_ids
    assert len(tokens) > max(LENGTHS) and len(LENGTHS) >= 48
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(
        pa.table({"id": [f"p{n}" for n in LENGTHS], "prompt": [tokens[i : i + n] for i, n in enumerate(LENGTHS)]}),
        path,
    )
    return path


def _overrides(prompts, output):
    return [f"input.path={prompts}", f"output.path={output}", f"sampling.max_tokens={MAX_TOKENS}"]


@pytest.fixture(scope="module")
def colocated(ray_cluster, prompts, tmp_path_factory):
    output = tmp_path_factory.mktemp("colocated")
    run(job_config("mode=colocated", *_overrides(prompts, output)))
    return _tokens_by_id(read_output(str(output)))


@pytest.fixture(scope="module")
def disaggregated(ray_cluster, prompts, tmp_path_factory):
    output = tmp_path_factory.mktemp("disaggregated")
    metrics = run(job_config("mode=disaggregated", *_overrides(prompts, output)))
    return _tokens_by_id(read_output(str(output))), metrics


def _tokens_by_id(table: pa.Table) -> dict[str, list[int]]:
    assert table.column("error").null_count == table.num_rows, table.column("error").to_pylist()
    return dict(zip(table.column("id").to_pylist(), table.column("generated_tokens").to_pylist()))


def test_disaggregated_tokens_equal_colocated(colocated, disaggregated):
    tokens, _ = disaggregated
    assert set(tokens) == set(colocated) == {f"p{n}" for n in LENGTHS}
    different = [k for k in colocated if tokens[k] != colocated[k]]
    assert not different, f"{len(different)} of {len(colocated)} rows differ: {different}"
    assert all(len(t) == MAX_TOKENS or t[-1] == 2 for t in tokens.values())


def test_engine_pools_run_on_their_own_cores(disaggregated):
    _, metrics = disaggregated
    (prefill,), (decode,) = metrics["stages"]["prefill"]["worker_cores"], metrics["stages"]["decode"]["worker_cores"]
    assert prefill and decode and set(prefill).isdisjoint(decode)
    assert set(prefill) | set(decode) == os.sched_getaffinity(0)


def test_kv_bytes_per_prompt_token_match_the_model_geometry(disaggregated, model):
    _, metrics = disaggregated
    assert model.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    assert metrics["kv_bytes_per_prompt_token"] == model.kv_bytes_per_token
    assert metrics["kv_bytes_moved"] == model.kv_bytes_per_token * sum(LENGTHS)


class Scramble:
    """Replaces every KV payload with noise of the same shape and dtype."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: pa.Table) -> pa.Table:
        noisy = [payload.KVPayload(torch.randn_like(p.kv), p.fingerprint) if p else None for p in payload.from_columns(batch)]
        return with_columns(batch, **payload.to_columns(noisy, self.model))


def test_decode_really_uses_the_payload(ray_cluster, model, prompts, disaggregated):
    """The same pipeline with noise in place of the KV generates different text."""
    clean, _ = disaggregated
    cfg = job_config("mode=disaggregated", *_overrides(prompts, "unused"))
    ds, carried = PromptSource(cfg.input).read(cfg.cluster.io_num_cpus)
    sink, _handle = start_sink()
    stages = plan(cfg, model, carried, sink)
    at = [s.name for s in stages].index("decode")
    ds = build(ds, stages[:at]).map_batches(Scramble, fn_constructor_kwargs={"model": model}, batch_format="pyarrow",
                                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)  # fmt: skip
    scrambled = _tokens_by_id(pa.concat_tables(ray.get(build(ds, stages[at:]).to_arrow_refs())))
    long_prompts = [f"p{n}" for n in LENGTHS if n >= 16]
    changed = [k for k in long_prompts if scrambled[k] != clean[k]]
    assert len(changed) >= 0.9 * len(long_prompts), f"only {len(changed)} of {len(long_prompts)} changed"
