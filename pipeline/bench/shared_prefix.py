"""Shared prefixes travel once: what storing a KV block that rows share once, and fetching it
once per decode worker, saves against every row carrying all its KV. One workload (every prompt
the same ~1,000 tokens of instructions and reports, then 50 to 150 tokens of its own, as a
system prompt or a document asked many questions) runs colocated, disaggregated with
kv.shared_block_tokens=0, and disaggregated with sharing on, rows ordered by prefix (the
default) and in input order. Per run: the KV bytes moved and their multiple of sharing's, the
shared blocks referenced, stored and fetched, the bytes that did not move, the handoff's share
of prefill, output tokens/s against colocated's, the object store's peak, and the share of rows
whose tokens equal colocated's: sharing must change what moves, never what is generated. With
several shared texts (shared_prefix.prefixes) and pools of several workers, the last two runs
show what ordering rows by prefix saves.

Then the lifetime of shared blocks: the object store's peak with sharing on for a dataset of
shared_prefix.lifetime_rows rows over lifetime_prefixes texts and for 10 times both (batches of
8, as pipeline/bench/kv_handoff.py's 1x/10x pair): a block held past its last row would grow
it with the dataset."""

import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench.config import SharedPrefixConfig, SharedPrefixSettings
from pipeline.bench.kv_handoff import SCALE, agreement, job, output_tokens, small_batches
from pipeline.bench.sample import QUESTIONS, SENTENCES
from pipeline.columns import ID
from pipeline.config import JobConfig, Mode, Transport
from pipeline.engine.model import resolve_model
from pipeline.job.metrics import JobMetrics
from pipeline.stages.tokenize import PromptEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MIB = 2**20
INSTRUCTION = "Read the reports below, then answer the question that follows them.\n\n"
COLOCATED, UNSHARED, SHARED = "colocated", "disaggregated-unshared", "disaggregated-shared"
SHARED_INPUT_ORDER = "disaggregated-shared-input-order"


def one_token_words(tokenizer: "PreTrainedTokenizerBase") -> list[str]:
    """Words that are one token each after a space. A byte-level BPE splits text before every
    space-led word and never merges across, so n of them after the shared text are n tokens."""
    words = {w for s in SENTENCES + QUESTIONS for w in s.rstrip(".?").split() if w.isalpha()}
    # Sorted: a set's order changes with each process's hash seed, and the draws must not.
    return sorted(w for w in words if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1)


def shared_text(rng: random.Random, tokens: int, tokenizer: "PreTrainedTokenizerBase") -> str:
    """Instructions and reports of at least `tokens` tokens, then the start of a question."""
    text = INSTRUCTION
    while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens:
        text += rng.choice(SENTENCES) + " "
    return text.rstrip() + "\n\nQuestion:"


def template_edges(encoder: PromptEncoder, shared: str, words: list[str]) -> tuple[int, int]:
    """The tokens every row begins with (the chat template's opening, then the shared text) and
    those each ends with after its own words (the template's closing), as the tokenize stage
    makes them: two rows that differ in their one word tell both."""
    (first, second), _ = encoder.encode_all([f"{shared} {words[0]}", f"{shared} {words[1]}"], [None, None])
    common = len(os.path.commonprefix([first, second]))
    return common, len(first) - common - 1


def write_workload(path: Path, settings: SharedPrefixSettings, encoder: PromptEncoder) -> int:
    """settings.rows prompts, one of settings.prefixes shared texts then words of their own, as
    a Parquet file (id, prompt); returns how many tokens the rows of the first text begin with."""
    rng = random.Random(settings.seed)
    words = one_token_words(encoder.tokenizer)
    texts = [shared_text(rng, settings.shared_tokens, encoder.tokenizer) for _ in range(settings.prefixes)]
    common, closing = template_edges(encoder, texts[0], words)

    def own_words() -> str:
        # A row's own tokens are its words and the template's closing. Dozens of words, each
        # drawn from ~150: no two rows are alike.
        count = rng.randint(settings.unique_tokens_min, settings.unique_tokens_max) - closing
        return "".join(f" {w}" for w in rng.choices(words, k=count))

    prompts = [texts[i % len(texts)] + own_words() for i in range(settings.rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [f"shared-prefix-{i:05d}" for i in range(settings.rows)]
    pq.write_table(pa.table({ID: ids, "prompt": prompts}), path)
    return common


def colocated(one: JobConfig) -> None:
    one.mode = Mode.colocated


def disaggregated(block_tokens: int, files: Path, ordered: bool = True) -> Callable[[JobConfig], None]:
    """mode=disaggregated, KV moved in blocks of `block_tokens` (0: each row all its own), in
    files under `files` with kv.transport=storage; rows ordered by prefix, or in input order."""

    def change(one: JobConfig) -> None:
        one.mode = Mode.disaggregated
        one.input.order_by_prefix = ordered
        one.kv.shared_block_tokens = block_tokens
        if one.kv.transport is Transport.storage:
            one.kv.storage_path = str(files)

    return change


def run_row(name: str, runs: dict[str, JobMetrics], tokens: dict[str, dict[str, list[int]]]) -> dict:
    """One run's figures, against sharing's bytes moved and colocated's rates and tokens."""
    metrics, shared, base = runs[name], runs[SHARED], runs[COLOCATED]

    def steady(m: JobMetrics) -> float:
        return m.output_tokens / m.processing_seconds

    return {
        "run": name,
        "kv_mib_moved": round(metrics.kv_bytes_moved / MIB, 1),
        "kv_moved_x_shared": round(metrics.kv_bytes_moved / shared.kv_bytes_moved, 2)
        if shared.kv_bytes_moved
        else None,
        "kv_blocks_referenced": metrics.kv_blocks_referenced,
        "kv_blocks_stored": metrics.kv_blocks_stored,
        "kv_blocks_fetched": metrics.kv_blocks_fetched,
        "kv_mib_saved": round(metrics.kv_bytes_saved / MIB, 1),
        "kv_handoff_share_of_prefill": metrics.kv_handoff_share_of_prefill,
        "output_tokens_per_s_processing": round(steady(metrics), 2),
        "output_tokens_per_s_wall": metrics.output_tokens_per_second,
        "x_colocated_processing": round(steady(metrics) / steady(base), 3),
        "x_colocated_wall": round(metrics.output_tokens_per_second / base.output_tokens_per_second, 3),
        "object_store_peak_mib": round(metrics.object_store_peak_bytes / MIB, 1),
        "rows_identical_to_colocated": agreement(tokens[name], tokens[COLOCATED])["rows_identical"],
    }


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k in header) + " |" for r in rows]
    return "\n".join(lines)


def shared_prefix(cfg: SharedPrefixConfig) -> list[dict]:
    """The workload through each run; writes shared_prefix.json into output.path and prints the
    table."""
    root, settings = Path(cfg.output.path), cfg.shared_prefix
    encoder = PromptEncoder(resolve_model(cfg.model, cfg.engine), cfg.input, cfg.sampling.max_tokens)
    common = write_workload(Path(cfg.input.path), settings, encoder)
    print(
        f"{settings.rows} rows, each beginning with one of {settings.prefixes} texts of ~{common} tokens; "
        f"KV by {cfg.kv.transport.value}; {cfg.pools.prefill.size} prefill and {cfg.pools.decode.size} decode workers"
    )
    files = Path(cfg.kv.storage_path or root / "kv-files")
    changes = {
        COLOCATED: colocated,
        UNSHARED: disaggregated(0, files / UNSHARED),
        SHARED: disaggregated(cfg.kv.shared_block_tokens, files / SHARED),
        SHARED_INPUT_ORDER: disaggregated(cfg.kv.shared_block_tokens, files / SHARED_INPUT_ORDER, ordered=False),
    }
    runs = {name: job(cfg, name, cfg.input.path, root, change) for name, change in changes.items()}
    tokens = {name: output_tokens(root / name) for name in runs}
    rows = [run_row(name, runs, tokens) for name in runs]
    for row in rows:
        print(json.dumps(row))
    print(markdown(rows))
    scale = lifetime(cfg, encoder, files)
    (root / "shared_prefix.json").write_text(
        json.dumps(
            {
                "rows": settings.rows,
                "prefixes": settings.prefixes,
                "shared_prefix_tokens": common,
                "runs": rows,
                "lifetime": scale,
            },
            indent=2,
        )
    )
    return rows


def lifetime(cfg: SharedPrefixConfig, encoder: PromptEncoder, files: Path) -> dict:
    """The object store's peak with shared blocks, for the lifetime dataset and SCALE times it
    (as many rows a text); prints one line and returns the figures."""
    root, settings, runs = Path(cfg.output.path), cfg.shared_prefix, {}
    for times in (1, SCALE):
        scaled = replace(settings, rows=settings.lifetime_rows * times, prefixes=settings.lifetime_prefixes * times)
        path = root / f"lifetime-{times}x.parquet"
        write_workload(path, scaled, encoder)
        name = f"lifetime-{times}x"
        sharing = disaggregated(cfg.kv.shared_block_tokens, files / name)
        runs[times] = job(cfg, name, str(path), root, sharing, small_batches)
    peaks = {times: m.object_store_peak_bytes for times, m in runs.items()}
    growth = peaks[SCALE] / peaks[1] - 1
    print(
        f"object-store peak with shared blocks, budget {cfg.cluster.object_store_budget_gib or 'Ray Data default'} "
        f"GiB: {settings.lifetime_rows} rows over {settings.lifetime_prefixes} texts {peaks[1] / MIB:.0f} MiB, "
        f"{SCALE}x {peaks[SCALE] / MIB:.0f} MiB ({growth:+.1%})"
    )
    return {
        "peak_bytes": peaks,
        "growth": round(growth, 4),
        "kv_blocks_stored": {times: m.kv_blocks_stored for times, m in runs.items()},
        "kv_mib_moved": {times: round(m.kv_bytes_moved / MIB, 1) for times, m in runs.items()},
    }
