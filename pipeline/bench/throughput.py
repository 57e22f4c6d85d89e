"""Side by side on one dataset, in one run, on the same cores: plain vLLM `LLM.generate`, the
colocated pipeline and the disaggregated pipeline. Per mode: wall time split into start-up and
processing, output tokens/s and the ratio to plain vLLM, each engine pool's rates while busy,
the pipeline's efficiency against its slower pool, the KV handoff, peak RSS and object-store
peak (defined in pipeline/bench/results.py)."""

import copy
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from pipeline.bench.config import BenchConfig, BenchMode, BenchSettings
from pipeline.bench.results import BENCH_JSON, PlainRun, bench_rows, fastest, markdown, write
from pipeline.cluster import start_ray
from pipeline.columns import GENERATED_TOKENS
from pipeline.config import JobConfig, Mode
from pipeline.engine.build import bind_threads, build_engine
from pipeline.engine.model import resolve_model
from pipeline.engine.sampling import RowSampling
from pipeline.errors import JobError
from pipeline.io.storage import read_output
from pipeline.job.run import run
from pipeline.job.usage import ProcessTreeRSSPeak
from pipeline.job.validate import check_job
from pipeline.stages.tokenize import PromptEncoder


def plain_vllm(cfg: JobConfig) -> dict:
    """The baseline, in a process of its own, so that what its engine leaves behind (memory, its
    threads) weighs on no later mode."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
        return process.submit(_generate_all, cfg).result()


def _generate_all(cfg: JobConfig) -> dict:
    """One engine on every core, all prompts in one generate call."""
    started = time.perf_counter()
    model = resolve_model(cfg.model, cfg.engine)
    encoder = PromptEncoder(model, cfg.input, cfg.sampling.max_tokens)
    prompts = [encoder.encode(p)[0] for p in pq.read_table(cfg.input.path).column(cfg.input.prompt_column).to_pylist()]
    prompts = [p for p in prompts if p]
    bind_threads(None, None)
    llm = build_engine(model, cfg.engine, cfg.pools.colocated)
    sampling = RowSampling(cfg.sampling, cfg.input.sampling_column)
    generating = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [
            sampling.params(asdict(cfg.sampling), min(cfg.sampling.max_tokens, model.max_model_len - len(p)))
            for p in prompts
        ],
        use_tqdm=False,
    )
    done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return asdict(PlainRun(done - started, done - generating, len(prompts), tokens))


def pipeline_mode(cfg: JobConfig, mode: Mode, root: Path) -> dict:
    """One mode's metrics and tokens; a mode whose pools cannot fit the cluster is reported,
    not raised, so a sweep goes on to its next split."""
    job = copy.deepcopy(cfg)
    job.mode = mode
    job.output.path = str(root / mode.value)
    job.output.overwrite = True
    try:
        metrics = run(job)
    except JobError as error:
        return {"error": str(error)}
    assert metrics.rows_out == metrics.rows_in, "rows lost"
    return {**asdict(metrics), "tokens": read_output(job.output.path, [GENERATED_TOKENS]).column(0).to_pylist()}


def later_job_of_sweep() -> bool:
    """Whether Hydra runs this bench as a job of a sweep (-m) other than its first."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode is RunMode.MULTIRUN and hydra_cfg.job.num > 0


def modes(settings: BenchSettings, later_in_sweep: bool) -> list[BenchMode]:
    """What this run measures, in the order it runs them: plain vLLM before Ray starts."""
    skip = {BenchMode.plain, BenchMode.colocated} if settings.baselines_once and later_in_sweep else set()
    return [mode for mode in BenchMode if mode in settings.modes and mode not in skip]


def bench(cfg: BenchConfig, root: Path, later_in_sweep: bool = False) -> Path:
    """Runs the modes in turn, bench.rounds times; writes bench.json, bench.md and bench.png into
    `root`, prints the table and returns bench.json's path."""
    check_job(cfg)
    rounds: dict[str, list[dict]] = {}
    for _ in range(cfg.bench.rounds):
        for mode in modes(cfg.bench, later_in_sweep):
            if mode is not BenchMode.plain:
                start_ray(cfg.cluster)  # the first call starts Ray; the pipeline modes share it
            with ProcessTreeRSSPeak() as rss:
                result = plain_vllm(cfg) if mode is BenchMode.plain else pipeline_mode(cfg, Mode(mode.value), root)
            rounds.setdefault(mode.value, []).append({**result, "peak_rss_bytes": rss.peak})
    results = {mode: fastest(runs) for mode, runs in rounds.items()}
    tokens = {mode: r.pop("tokens") for mode, r in results.items() if "tokens" in r}
    if len(tokens) == 2:
        results["disaggregated_equals_colocated"] = tokens["colocated"] == tokens["disaggregated"]
    rows = bench_rows(results)
    write(root, results, rows)
    print("\n".join(markdown(rows)))
    if len(tokens) == 2:
        print(f"disaggregated tokens identical to colocated: {results['disaggregated_equals_colocated']}")
    return root / BENCH_JSON
