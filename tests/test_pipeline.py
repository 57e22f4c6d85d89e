"""End to end on the real engine and model: the disaggregated pipeline generates exactly what
the colocated one does, because the decode pool really uses the prefill pool's KV."""

import dataclasses
import os
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoTokenizer

from pipeline.bench.sample import SENTENCES
from pipeline.columns import KV_PAYLOAD, with_columns
from pipeline.io.storage import read_output
from pipeline.job.metrics import ShardCounts
from pipeline.job.run import run
from pipeline.kv import payload
from pipeline.kv.payload import KVPayload
from tests.conftest import job_config

pytestmark = pytest.mark.slow

# Around every multiple of the plausible block sizes (16..128), up to 4 blocks of 128: below, at,
# one past; and lengths between.
AROUND = {m + d for m in (16, 32, 64, 128, 192, 256, 384, 512) for d in (-1, 0, 1)}
LENGTHS = sorted(AROUND | {1, 2, 3, 4, 5, 8, 12, 47, 90, 100, 150, 230, 300, 420, 450})
MAX_TOKENS = 16
FEW = [n for n in LENGTHS if 16 <= n <= 300]  # enough KV to matter, quick to prefill


@pytest.fixture(scope="module")
def prompts(model, tmp_path_factory):
    """Natural-text prompts cut to exact token lengths, as token ids."""
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    text = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(7 * len(SENTENCES)))
    tokens = tokenizer(text).input_ids
    assert len(tokens) > max(LENGTHS) and len(LENGTHS) > 32  # more rows than an engine pool's batch
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(
        pa.table({"id": [f"p{n}" for n in LENGTHS], "prompt": [tokens[i : i + n] for i, n in enumerate(LENGTHS)]}),
        path,
    )
    return path


@pytest.fixture(scope="module")
def few_prompts(prompts, tmp_path_factory):
    """The prompts of FEW's lengths."""
    table = pq.read_table(prompts)
    path = tmp_path_factory.mktemp("few") / "prompts.parquet"
    pq.write_table(table.filter(pa.array([len(p) in FEW for p in table.column("prompt").to_pylist()])), path)
    return path


def _overrides(prompts, output):
    return [f"input.path={prompts}", f"output.path={output}", f"sampling.max_tokens={MAX_TOKENS}"]


@pytest.fixture(scope="module")
def colocated_run(ray_cluster, prompts, tmp_path_factory):
    output = tmp_path_factory.mktemp("colocated")
    return output, run(job_config("mode=colocated", *_overrides(prompts, output)))


@pytest.fixture(scope="module")
def colocated(colocated_run):
    output, _ = colocated_run
    return _tokens_by_id(read_output(str(output)))


@pytest.fixture(scope="module")
def disaggregated_run(ray_cluster, prompts, tmp_path_factory):
    """Engine caches of 0.1 GiB (18 blocks of 128 tokens), where a batch of the prompts needs
    dozens: the decode engine preempts requests, and each loads its KV again when it resumes."""
    output = tmp_path_factory.mktemp("disaggregated")
    return output, run(job_config("mode=disaggregated", *_overrides(prompts, output), "engine.kv_cache_gib=0.1"))


@pytest.fixture(scope="module")
def disaggregated(disaggregated_run):
    output, metrics = disaggregated_run
    return _tokens_by_id(read_output(str(output))), metrics


def _tokens_by_id(table: pa.Table) -> dict[str, list[int]]:
    assert table.column("error").null_count == table.num_rows, table.column("error").to_pylist()
    return dict(zip(table.column("id").to_pylist(), table.column("generated_tokens").to_pylist()))


def test_disaggregated_tokens_equal_colocated(colocated, disaggregated):
    tokens, metrics = disaggregated
    assert set(tokens) == set(colocated) == {f"p{n}" for n in LENGTHS}
    different = [k for k in colocated if tokens[k] != colocated[k]]
    assert not different, f"{len(different)} of {len(colocated)} rows differ: {different}"
    assert all(len(t) == MAX_TOKENS or t[-1] == 2 for t in tokens.values())
    assert metrics.preemptions > 0


def test_engine_pools_run_on_their_own_cores(disaggregated):
    _, metrics = disaggregated
    (prefill,), (decode,) = metrics.stages["prefill"].worker_cores, metrics.stages["decode"].worker_cores
    assert prefill and decode and set(prefill).isdisjoint(decode)
    assert set(prefill) | set(decode) == os.sched_getaffinity(0)


def test_kv_bytes_per_prompt_token_match_the_model_geometry(disaggregated, model):
    _, metrics = disaggregated
    assert model.cache.bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    assert metrics.kv_bytes_per_prompt_token == model.cache.bytes_per_token
    assert metrics.kv_bytes_moved == model.cache.bytes_per_token * sum(LENGTHS)


def test_engine_steps_and_token_gaps_are_the_engines_own(colocated_run, disaggregated):
    """Every generated token after a request's first is one inter-token gap; prefill samples
    only first tokens; every step is timed."""
    _, colocated_metrics = colocated_run
    _, metrics = disaggregated
    rows = len(LENGTHS)
    for pool, outputs in (
        (colocated_metrics.stages["colocated"], colocated_metrics.output_tokens),
        (metrics.stages["decode"], metrics.output_tokens),
    ):
        assert pool.inter_token_seconds.count == outputs - rows
        assert pool.step_seconds.count == pool.engine_steps >= MAX_TOKENS
        gaps = pool.inter_token_seconds
        assert 0 < gaps.p50 <= gaps.p90 <= gaps.p99 <= gaps.max * 1.03
    prefill = metrics.stages["prefill"]
    assert prefill.inter_token_seconds is None and prefill.step_seconds.count == prefill.engine_steps > 0


def test_prefill_runs_at_hundreds_of_flops_per_byte_and_decode_at_tens(colocated_run, disaggregated):
    """The asymmetry the split exists for, on the job's own run: shares of the peaks measured for
    this machine's cores, FLOPs per byte by the work's definition."""
    _, colocated_metrics = colocated_run
    _, metrics = disaggregated
    prefill, decode = metrics.stages["prefill"].utilisation, metrics.stages["decode"].utilisation
    both = colocated_metrics.stages["colocated"].utilisation
    for u in (prefill, decode, both):
        assert 0 < u.compute_share <= 1 and 0 < u.bandwidth_share <= 1
        assert u.device.endswith("1 core") or u.device.endswith("2 cores")
    assert prefill.intensity > 100 > decode.intensity and decode.intensity < both.intensity < prefill.intensity
    assert prefill.compute_share > decode.compute_share and decode.bandwidth_share > prefill.bandwidth_share


@pytest.fixture(scope="module")
def prefilled(ray_cluster, few_prompts, tmp_path_factory):
    """jobs.prefill with the KV inline in the dataset (kv.transport=object_store)."""
    output = tmp_path_factory.mktemp("prefilled")
    return output, run(job_config("phase=prefill", *_overrides(few_prompts, output)))


def test_a_prefill_dataset_with_inline_kv_is_written_by_the_workers(prefilled):
    """Every payload is written where it was computed; the driver receives fragment names and
    row numbers, a few dozen bytes a row."""
    output, metrics = prefilled
    dataset = read_output(str(output))
    data = pa.concat_arrays([c.field("data") for c in dataset.column(KV_PAYLOAD).chunks])
    assert dataset.num_rows == len(FEW) and data.null_count == 0
    assert metrics.kv_bytes_moved == 46_080 * sum(FEW)
    assert 0 < metrics.driver_bytes_received < metrics.kv_bytes_moved / 10_000


TAMPERED = {f"p{n}": ("noise", "damage", "drop", "foreign", None)[k % 5] for k, n in enumerate(FEW)}


def _tamper(model, prefilled, path) -> None:
    """The prefill dataset with each row's KV as TAMPERED says: replaced by noise (under a valid
    checksum), its bytes damaged, dropped, or labelled as another model's."""
    table = read_output(str(prefilled))
    payloads = payload.from_column(table)
    for i, row_id in enumerate(table.column("id").to_pylist()):
        p, action = payloads[i], TAMPERED[row_id]
        if action == "noise":
            payloads[i] = KVPayload.encode(torch.randn_like(p.decode(model, p.num_tokens)), model, p.codec)
        elif action == "damage":
            data = p.data.copy()
            data[::997] ^= 0xFF
            payloads[i] = dataclasses.replace(p, data=data)
        elif action == "drop":
            payloads[i] = None
        elif action == "foreign":
            payloads[i] = dataclasses.replace(p, fingerprint="0000000000000000")
    pq.write_table(with_columns(table, **{KV_PAYLOAD: payload.to_column(payloads)}), path)


def _fate(table: pa.Table, clean: dict, action: str | None) -> list:
    by_id = {r["id"]: r for r in table.to_pylist()}
    return [(by_id[k]["generated_tokens"] == clean[k], by_id[k]["error"]) for k, a in TAMPERED.items() if a == action]


def test_tampered_payloads_are_refused_and_the_rest_complete(ray_cluster, model, prefilled, disaggregated, tmp_path):
    """jobs.decode with kv.on_load_failure=error on the prefill dataset, tampered: damaged or
    missing KV and another model's KV are row errors; noise under a valid checksum changes the
    output (decode really uses the payload); the other rows are untouched. (With recompute, the
    default, lost payloads are prefilled again: test_crafted_prefill_rows_fail_alone_and_the_rest_decode.)"""
    clean, _ = disaggregated
    _tamper(model, prefilled[0], tmp_path / "tampered.parquet")
    out = tmp_path / "out"
    run(job_config("phase=decode", *_overrides(tmp_path / "tampered.parquet", out), "kv.on_load_failure=error"))
    table = read_output(str(out))
    assert table.num_rows == len(FEW)
    noise = _fate(table, clean, "noise")
    assert sum(same for same, _ in noise) <= 1 and all(error is None for _, error in noise), noise
    assert all(e.startswith("kv_corrupt: KV payload fails its checksum") for _, e in _fate(table, clean, "damage"))
    assert all(e.startswith("kv_missing: KV payload is missing") for _, e in _fate(table, clean, "drop"))
    assert all(
        e.startswith("kv_mismatch: KV payload is from model 0000000000000000")
        for _, e in _fate(table, clean, "foreign")
    )
    untouched = [k for k, action in TAMPERED.items() if action is None]
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert all(by_id[k]["error"] is None and by_id[k]["generated_tokens"] == clean[k] for k in untouched)


def test_killed_workers_are_replaced_and_their_rows_redone(ray_cluster, few_prompts, colocated, tmp_path):
    """SIGKILL the prefill worker and then the decode worker, each once it has finished a batch
    and is working on the next: Ray starts replacements, the lost batches are redone, and
    every row comes out once with the same tokens. The KV goes through files, kept as asked."""
    output, storage = tmp_path / "out", tmp_path / "kv"
    small = [f"pools.{p}.batch_size=4" for p in ("tokenize", "prefill", "decode", "detokenize")]
    kv = ["kv.transport=storage", f"kv.storage_path={storage}", "kv.keep_files=true"]
    cfg = job_config("mode=disaggregated", *_overrides(few_prompts, output), "output.shard_rows=4", *small, *kv)
    killed: list[str] = []
    killer = threading.Thread(target=_kill_each_after_one_batch, args=(["prefill", "decode"], killed), daemon=True)
    killer.start()
    metrics = run(cfg)
    killer.join(timeout=5)
    assert killed == ["prefill", "decode"]
    table = read_output(str(output))
    assert table.column("id").to_pylist() == [f"p{n}" for n in FEW]  # each row once, in input order
    assert _tokens_by_id(table) == {k: colocated[k] for k in TAMPERED}
    assert metrics.stages["prefill"].workers == 2 and metrics.stages["decode"].workers == 2
    assert metrics.shards == ShardCounts(total=-(-len(FEW) // 4), resumed=0)
    assert metrics.kv_bytes_per_prompt_token == 46_080
    assert len(list(storage.rglob("*.kv"))) >= len(FEW)  # a redone batch's payloads are written again


def _kill_each_after_one_batch(stages: list[str], killed: list[str]) -> None:
    before = _metric_sinks()
    while not (started := _metric_sinks() - before):
        time.sleep(0.2)
    sink = ray.get_actor(started.pop())
    for stage in stages:
        while (totals := ray.get(sink.stages.remote()).get(stage)) is None or totals.batches < 1:
            time.sleep(0.2)
        for process in psutil.process_iter(["cmdline"]):
            if f"MapBatches({stage.capitalize()})" in " ".join(process.info["cmdline"] or ()):
                process.kill()
                killed.append(stage)


def _metric_sinks() -> set[str]:
    return {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("kvrelay-metrics")
    }


def test_every_parquet_reader_opens_a_finished_output(ray_cluster, disaggregated_run):
    """Only row parts lack a leading underscore: readers given the directory, with no options,
    read the rows and nothing else."""
    import duckdb
    import pandas
    import pyarrow.dataset as ds

    output = str(disaggregated_run[0])
    expected = sorted(read_output(output).column("id").to_pylist())
    ids = {
        "pandas": pandas.read_parquet(output)["id"].tolist(),
        "pyarrow.parquet": pq.read_table(output).column("id").to_pylist(),
        "pyarrow.dataset": ds.dataset(output).to_table().column("id").to_pylist(),
        "ray.data": [row["id"] for row in ray.data.read_parquet(output).select_columns(["id"]).take_all()],
        "duckdb": [row[0] for row in duckdb.sql(f"select id from read_parquet('{output}/*.parquet')").fetchall()],
    }
    assert {reader: sorted(got) for reader, got in ids.items()} == dict.fromkeys(ids, expected)


def _prefilled_dataset(model, prompts, colocated, path) -> dict[str, str | None]:
    """A prefill dataset as another tool might leave it: its payload column's bytes `binary`
    and its fields in reverse order, every row's num_input_tokens 0, and crafted rows. The good
    rows have no payload: decode recomputes their prefill. Returns each row's expected error kind."""
    by_id = dict(zip(*pq.read_table(prompts).to_pydict().values()))
    kv = torch.zeros(model.cache.token_shape(16))
    good = KVPayload.encode(kv, model, "none")
    rows = [(f"p{n}", by_id[f"p{n}"], colocated[f"p{n}"][:1], None, None) for n in (16, 17, 31, 32, 63)]
    p16, first = by_id["p16"], colocated["p16"][:1]
    short = good.data[:-4]
    rows += [
        ("codec", p16, first, dataclasses.replace(good, codec="zstd"), "kv_mismatch"),
        ("short_bytes", p16, first, dataclasses.replace(good, data=short, checksum=payload.checksum(short)), None),
        ("null_shape", p16, first, good, None),
        ("oov_prompt", [*p16, 49152], first, None, "invalid_token_ids"),
        ("negative_first", p16, [-1], None, "invalid_token_ids"),
        ("two_first", p16, first * 2, None, "invalid_first_token"),
        ("overlong", by_id["p64"], colocated["p64"][:1], None, "overlong_prompt"),
    ]
    structs = [
        {
            **{f: getattr(p, f) for f in payload.TYPE.names},
            "shape": None if row_id == "null_shape" else list(p.shape),
            "data": p.data.tobytes(),
        }
        if p
        else None
        for row_id, _, _, p, _ in rows
    ]
    fields = [pa.field(f.name, pa.binary() if f.name == "data" else f.type) for f in reversed(list(payload.TYPE))]
    pq.write_table(
        pa.table(
            {
                "id": [r[0] for r in rows],
                "prompt_token_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
                "generated_tokens": pa.array([r[2] for r in rows], pa.list_(pa.int32())),
                "num_input_tokens": pa.array([0] * len(rows), pa.int32()),
                "finish_reason": pa.nulls(len(rows), pa.string()),
                "error": pa.nulls(len(rows), pa.string()),
                KV_PAYLOAD: pa.array(structs, pa.struct(fields)),
            }
        ),
        path,
    )
    return {r[0]: r[4] for r in rows}


def test_crafted_prefill_rows_fail_alone_and_the_rest_decode(ray_cluster, model, prompts, colocated, tmp_path):
    """jobs.decode with model.max_model_len=64 on a crafted prefill dataset: each crafted row
    gets its error, a lost payload is recomputed, a 63-token prompt has room for one token, and
    the other rows get colocated's tokens, in one batch."""
    expected = _prefilled_dataset(model, prompts, colocated, tmp_path / "prefilled.parquet")
    out = tmp_path / "out"
    metrics = run(
        job_config("phase=decode", *_overrides(tmp_path / "prefilled.parquet", out), "model.max_model_len=64")
    )
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    assert {k: r["error"] and r["error"].split(":", 1)[0] for k, r in rows.items()} == expected
    assert {k: r["error_kind"] for k, r in rows.items()} == expected
    assert rows["p63"]["generated_tokens"] == colocated["p63"][:1] and rows["p63"]["finish_reason"] == "length"
    decoded = ["p16", "p17", "p31", "p32"]
    assert all(rows[k]["generated_tokens"] == colocated[k] for k in decoded)
    assert all(rows[k]["generated_tokens"] == colocated["p16"] for k in ("short_bytes", "null_shape"))
    assert all(rows[k]["num_input_tokens"] == int(k[1:]) for k in decoded)
    # The five rows without a payload (p16 ... p63) and the two with damaged ones.
    assert metrics.kv_recomputed_rows == 7
