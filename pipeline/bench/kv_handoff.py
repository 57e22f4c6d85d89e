"""What the KV handoff costs, side by side in one run on one dataset:

- per codec (none, fp8, int8): KV bytes per prompt token against the model's formula, token
  agreement with the uncompressed run (share of rows identical, mean position of the first
  different token), handoff time as a share of prefill compute;
- per transport (object store, storage): the same, tokens identical to the object store's;
- peak object-store bytes for the dataset and for 10 times it (batches of 8), under the
  object-store budget cluster.object_store_budget_gib: prefill must not run ahead of decode
  without limit."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import start_ray
from pipeline.columns import GENERATED_TOKENS, ID
from pipeline.config import Codec, JobConfig, Transport
from pipeline.engine.model import resolve_model
from pipeline.io.storage import read_output
from pipeline.job.metrics import JobMetrics
from pipeline.job.run import run
from pipeline.job.validate import check_job

SCALE = 10
SCALE_BATCH = 8


def repeated(path: str, repeat: int, target: Path) -> str:
    """The prompts `repeat` times over, under new ids."""
    table = pq.read_table(path)
    copies = [
        table.set_column(
            table.schema.get_field_index("id"), "id", pa.array([f"{r}-{i}" for i in table["id"].to_pylist()])
        )
        for r in range(repeat)
    ]
    pq.write_table(pa.concat_tables(copies), target)
    return str(target)


def small_batches(one: JobConfig) -> None:
    """Batches of SCALE_BATCH rows, so that even the smaller dataset of a 1x/10x pair spans
    many: the object store's peak then shows what backpressure and lifetimes let pile up, not
    the size of one batch's KV."""
    for pool in (one.pools.tokenize, one.pools.prefill, one.pools.decode, one.pools.detokenize):
        pool.batch_size = SCALE_BATCH


def job(cfg: JobConfig, name: str, path: str, root: Path, *changes) -> JobMetrics:
    one = copy.deepcopy(cfg)
    one.input.path, one.output.path, one.output.overwrite = path, str(root / name), True
    for change in changes:
        change(one)
    return run(one)


def output_tokens(url: Path) -> dict[str, list[int]]:
    """A finished run's generated tokens by row id."""
    table = read_output(str(url), [ID, GENERATED_TOKENS])
    return dict(zip(table[ID].to_pylist(), table[GENERATED_TOKENS].to_pylist()))


def agreement(run: dict, reference: dict) -> dict:
    """Share of rows whose tokens equal the reference's, and where the others first differ."""
    firsts = [
        next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        for key, ref in reference.items()
        if (got := run[key]) != ref
    ]
    return {
        "rows_identical": round(1 - len(firsts) / len(reference), 4),
        "mean_first_divergence": round(sum(firsts) / len(firsts), 2) if firsts else None,
    }


def kv_bench(cfg: JobConfig) -> dict:
    """Every run above; writes kv_bench.json into output.path, prints the table and returns it."""
    check_job(cfg)
    root = Path(cfg.output.path)
    root.mkdir(parents=True, exist_ok=True)
    model = resolve_model(cfg.model, cfg.engine)
    start_ray(cfg.cluster)
    prompts = cfg.input.path

    def codec(c: Codec):
        return lambda j: setattr(j.kv, "codec", c)

    def storage(j: JobConfig) -> None:
        j.kv.transport, j.kv.storage_path = Transport.storage, str(root / "kv-files")

    changes = {f"codec={c.value}": codec(c) for c in Codec} | {"transport=storage": storage}
    runs = {name: job(cfg, name.replace("=", "-"), prompts, root, change) for name, change in changes.items()}
    tokens = {name: output_tokens(root / name.replace("=", "-")) for name in runs}
    reference = tokens["codec=none"]

    def steady(j: JobConfig) -> None:
        # Repeated prompts must cost what new ones do: computed again, and carrying all their KV.
        j.engine.enable_prefix_caching = False
        j.kv.shared_block_tokens = 0

    peaks = {
        times: job(
            cfg,
            f"scale-{times}x",
            repeated(prompts, times, root / f"scale-{times}.parquet"),
            root,
            steady,
            small_batches,
        ).object_store_peak_bytes
        for times in (1, SCALE)
    }

    bf16_bytes = replace(model.cache, dtype_bytes=2).bytes_per_token
    results = {"model_kv_bytes_per_token": model.cache.bytes_per_token, "bf16_kv_bytes_per_token": bf16_bytes}
    print(
        f"{'run':<20}{'B/prompt tok':>13}{'x bf16':>8}{'handoff/prefill':>16}{'rows identical':>15}{'1st diff at':>12}"
    )
    for name, r in runs.items():
        row = {
            "kv_bytes_per_prompt_token": r.kv_bytes_per_prompt_token,
            "ratio_to_bf16": round(r.kv_bytes_per_prompt_token / bf16_bytes, 4),
            "handoff_share_of_prefill": r.kv_handoff_share_of_prefill,
            "handoff_seconds": r.kv_handoff_seconds,
            "prefill_busy_seconds": r.stages["prefill"].busy_seconds,
            **agreement(tokens[name], reference),
        }
        results[name] = row
        print(
            f"{name:<20}{row['kv_bytes_per_prompt_token']:>13.1f}{row['ratio_to_bf16']:>8.3f}"
            f"{row['handoff_share_of_prefill']:>16.2%}{row['rows_identical']:>15.1%}{row['mean_first_divergence'] or '-':>12}"
        )
    growth = peaks[SCALE] / peaks[1] - 1
    budget = cfg.cluster.object_store_budget_gib
    results["object_store"] = {"budget_gib": budget, "peak_bytes": peaks, "growth": round(growth, 4)}
    print(
        f"object-store peak, budget {budget or 'Ray Data default'} GiB: dataset {peaks[1] / 2**20:.0f} MiB, "
        f"{SCALE}x {peaks[SCALE] / 2**20:.0f} MiB ({growth:+.1%})"
    )
    print(f"formula for codec=none: {model.cache.bytes_per_token} B per prompt token ({model.cache.family.value})")
    (root / "kv_bench.json").write_text(json.dumps(results, indent=2))
    return results
