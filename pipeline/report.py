"""The one-screen summary printed at the end of a job."""
from pipeline.config import JobConfig


def print_summary(cfg: JobConfig, metrics: dict) -> None:
    lines = [
        f"kvrelay {metrics['mode']} {metrics['phase']} run of {metrics['model']}: output in {cfg.output.path}",
        f"  rows        {metrics['rows_in']} in, {metrics['rows_out']} out, {metrics['rows_errored']} with errors",
        f"  shards      {metrics['shards']['total']}, {metrics['shards']['resumed']} committed by an earlier run",
        f"  tokens      {metrics['input_tokens']} in, {metrics['output_tokens']} out",
        f"  wall        {metrics['wall_seconds']:.1f} s, {metrics['output_tokens_per_second']:.1f} output tokens/s",
    ]
    for name, stage in metrics["stages"].items():
        lines.append(f"  {name:<11} {stage['busy_seconds']:.1f} s busy over {stage['workers']} worker(s), {stage['rows']} rows")
    if metrics["kv_bytes_moved"]:
        lines.append(
            f"  KV moved    {metrics['kv_bytes_moved'] / 2**20:.1f} MiB, {metrics['kv_bytes_per_prompt_token']:.0f} B per prompt token"
        )
    if metrics["kv_recomputed_rows"]:
        lines.append(f"  KV lost     {metrics['kv_recomputed_rows']} rows' prefill recomputed by the decode pool")
    lines.append(f"  object store peak {metrics['object_store_peak_bytes'] / 2**20:.1f} MiB")
    print("\n".join(lines))
