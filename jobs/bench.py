"""Side by side on one dataset, in one run, on the same cores: plain vLLM `LLM.generate`, the
colocated pipeline and the disaggregated pipeline. Prints output tokens/s and the ratio of each
to plain vLLM, and writes bench.json.

    python -m jobs.bench input.path=data/sample_prompts.parquet output.path=outputs/bench

Every run is timed end to end (engine start included), as a user would wait for it; plain
vLLM's generate-only time is printed too."""
import copy
import json
import time
from pathlib import Path

import hydra
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipeline.cluster import start_ray
from pipeline.config import JobConfig, Mode, register
from pipeline.engine import bind_threads, build_engine, sampling_params
from pipeline.io import read_output
from pipeline.job import run
from pipeline.model import resolve_model
from pipeline.stages.tokenize import PromptEncoder

register()


def plain_vllm(cfg: JobConfig) -> dict:
    """The baseline: one in-process engine on every core, all prompts in one generate call."""
    started = time.perf_counter()
    model = resolve_model(cfg.model)
    encoder = PromptEncoder(model, cfg.input, cfg.sampling.max_tokens)
    prompts = [encoder.encode(p)[0] for p in pq.read_table(cfg.input.path).column(cfg.input.prompt_column).to_pylist()]
    prompts = [p for p in prompts if p]
    bind_threads(None, None)
    llm = build_engine(model, cfg.engine, cfg.pools.colocated.batch_size)
    generating = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [sampling_params(cfg.sampling, min(cfg.sampling.max_tokens, model.max_model_len - len(p))) for p in prompts],
        use_tqdm=False,
    )
    done = time.perf_counter()
    del llm
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"wall_seconds": done - started, "generate_seconds": done - generating, "output_tokens": tokens}


def pipeline(cfg: JobConfig, mode: Mode, root: Path) -> dict:
    job = copy.deepcopy(cfg)
    job.mode = mode
    job.output.path = str(root / mode.value)
    job.output.overwrite = True
    metrics = run(job)
    assert metrics["rows_out"] == metrics["rows_in"], "rows lost"
    return {**metrics, "tokens": read_output(job.output.path, ["generated_tokens"]).column(0).to_pylist()}


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job: JobConfig = OmegaConf.to_object(cfg)
    root = Path(job.output.path)
    root.mkdir(parents=True, exist_ok=True)
    results = {"plain": plain_vllm(job)}
    start_ray(job.cluster)
    for mode in (Mode.colocated, Mode.disaggregated):
        results[mode.value] = pipeline(job, mode, root)
    same = results["colocated"].pop("tokens") == results["disaggregated"].pop("tokens")

    base = results["plain"]["output_tokens"] / results["plain"]["wall_seconds"]
    print(f"{'mode':<15}{'wall s':>9}{'out tokens':>12}{'tok/s':>9}{'x plain':>9}")
    for name, r in results.items():
        rate = r["output_tokens"] / r["wall_seconds"]
        r["ratio_to_plain"] = round(rate / base, 3)
        print(f"{name:<15}{r['wall_seconds']:>9.1f}{r['output_tokens']:>12}{rate:>9.1f}{rate / base:>9.2f}")
    print(f"plain vLLM generate alone: {results['plain']['generate_seconds']:.1f} s; "
          f"disaggregated tokens identical to colocated: {same}")  # fmt: skip
    (root / "bench.json").write_text(json.dumps({**results, "disaggregated_equals_colocated": same}, indent=2))


if __name__ == "__main__":
    main()
