"""The one-screen summary a job prints at its end."""

from pipeline.job.metrics import JobMetrics


def print_summary(output_path: str, m: JobMetrics) -> None:
    lines = [
        f"kvrelay {m.mode} {m.phase} run of {m.model}: output in {output_path}",
        f"  rows        {m.rows_in} in, {m.rows_out} out, {m.rows_errored} with errors",
        f"  shards      {m.shards.total}, {m.shards.resumed} committed by an earlier run",
        f"  tokens      {m.input_tokens} in, {m.output_tokens} out",
        f"  wall        {m.wall_seconds:.1f} s, {m.output_tokens_per_second:.1f} output tokens/s",
    ]
    for name, stage in m.stages.items():
        lines.append(f"  {name:<11} {stage.busy_seconds:.1f} s busy over {stage.workers} worker(s), {stage.rows} rows")
    if m.kv_bytes_moved:
        lines.append(
            f"  KV moved    {m.kv_bytes_moved / 2**20:.1f} MiB, {m.kv_bytes_per_prompt_token:.0f} B per prompt token"
        )
    if m.kv_recomputed_rows:
        lines.append(f"  KV lost     {m.kv_recomputed_rows} rows' prefill recomputed by the decode pool")
    lines.append(f"  object store peak {m.object_store_peak_bytes / 2**20:.1f} MiB")
    print("\n".join(lines))
