"""Whether the split pays, and why, in the figures of the planner that priced the options
(pipeline/plan/roofline.py) and of the sample's bench: what prefill weighs, which device each
phase is cheapest on, what holds the best split back (the network, decode's memory, the
engines kvrelay does not split), and how the split ran here (its handoff too)."""

from dataclasses import dataclass

from pipeline.bench.advice import Choice, Identity, decide, sig
from pipeline.plan.roofline import Hardware, Option, Planner


def phase_costs(planner: Planner, devices: list[Hardware]) -> dict[str, tuple[float, float]]:
    """Per device that holds the model: $ per million prompt tokens prefilled, and per million
    output tokens decoded (in its cheapest engine size)."""
    costs = {}
    for hw in devices:
        sizes = planner.engine_sizes(hw, planner.settings.max_devices)
        if sizes:
            prefill = hw.usd_per_hour / (planner.prefill_rate(hw) * 3600) * 1e6
            decode = min(hw.usd_per_hour / (planner.decode_rate(hw, tp) * 3600) * 1e6 for tp in sizes)
            costs[hw.name] = (prefill, decode)
    return costs


def cheapest_phases(costs: dict[str, tuple[float, float]]) -> str:
    """Which device each phase is cheapest on: a split pays only where they differ."""
    if len(costs) == 1:
        return f"one kind of device ({next(iter(costs))}): a split of it can only add the handoff and round the pools"
    prefill, decode = (sorted(costs, key=lambda name: costs[name][i]) for i in (0, 1))
    both = prefill[0] == decode[0]
    head = f"{prefill[0]} is the cheapest device for both phases" if both else "the phases are cheapest apart"
    return (
        f"{head}: prefill ${costs[prefill[0]][0]:.4g} per million prompt tokens on {prefill[0]} (next: {prefill[1]}, "
        f"${costs[prefill[1]][0]:.4g}), decode ${costs[decode[0]][1]:.4g} per million output tokens on {decode[0]} "
        f"(next: {decode[1]}, ${costs[decode[1]][1]:.4g})"
        + (": a split of it can only add the handoff and round the pools" if both else "")
    )


def phases(planner: Planner, options: list[Option]) -> str:
    """Which device each phase is cheapest on, among those of `options`."""
    devices = {p.hardware.name: p.hardware for o in options for p in o.pools}
    return cheapest_phases(phase_costs(planner, list(devices.values())))


def prefill_share(planner: Planner, colocated: Option) -> str:
    pool, w = colocated.pools[0], planner.workload
    prefill = w.prompt_tokens / planner.prefill_rate(pool.hardware)
    decode = w.output_tokens / planner.decode_rate(pool.hardware, pool.tp)
    share = prefill / (prefill + decode)
    short = "short prompts: " if share < 0.2 else ""
    return (
        f"{short}prefill is {share:.0%} of a colocated {pool.hardware.name}'s time ({w.prompt_tokens:,.0f} prompt and "
        f"{w.output_tokens:,.0f} output tokens per row): the most a split can move to other devices"
    )


def split_reasons(planner: Planner, colocated: Option, split: Option | None, options: list[Option]) -> list[str]:
    """Why the split does not pay, in the planner's figures: what prefill weighs, which devices
    suit each phase, and what holds the best split back (the network, decode's memory, engines
    kvrelay does not split)."""
    model, settings = planner.model, planner.settings
    reasons = [prefill_share(planner, colocated), phases(planner, options)]
    hw = colocated.pools[0].hardware
    if colocated.batch >= settings.max_batch and model.weight_bytes < 0.05 * hw.mem_gib * 2**30:
        reasons.append(
            f"a small model ({model.weight_bytes / 1e9:.2g} GB of weights, "
            f"{model.weight_bytes / (hw.mem_gib * 2**30):.1%} "
            f"of a {hw.name}'s memory): a colocated engine already batches plan.max_batch={settings.max_batch} "
            "sequences; decode gains no batch from a device of its own"
        )
    if split is not None and split.bound == "network":
        reasons.append(
            f"the split is bound by the network: {split.kv_gb_per_s:.3g} GB/s of KV, "
            f"{planner.kv_bytes_per_request / 2**20:.2f} MiB per prompt, is all that {planner.eff.network:.0%} of "
            f"its links carry (plan.network_gbps={settings.network_gbps:g} per device where the catalogue gives no NIC)"
        )
    if split is not None and split.batch < settings.max_batch:
        reasons.append(
            f"decode on {split.pools[1].hardware.name} holds {split.batch} sequences beside "
            f"{model.weight_bytes / 1e9:.3g} GB of weights (plan.max_batch={settings.max_batch}): each step re-reads "
            "the weights for few tokens"
        )
    wider = [o for o in options if not o.runnable and o.usd_per_m_tokens < colocated.usd_per_m_tokens]
    if wider:
        o = min(wider, key=lambda o: o.usd_per_m_tokens)
        reasons.append(
            f"a split of tensor-parallel engines ({' -> '.join(f'{p.devices} {p.hardware.name}' for p in o.pools)}) "
            f"would cost {1 - o.usd_per_m_tokens / colocated.usd_per_m_tokens:.0%} less, but kvrelay does not move "
            "their KV yet"
        )
    return reasons


def measured_split(rows: dict[str, dict]) -> str:
    """The machine at hand's split against colocated, as the bench's rows measured them."""
    split, colocated, plain = rows["disaggregated"], rows["colocated"], rows.get("plain")
    rate = "processing_output_tokens_per_s"
    against = f", plain vLLM's {plain[rate]:.1f}" if plain and "error" not in plain else ""
    return (
        f"measured here, the split ran at {split[rate]:.1f} output tok/s while processing against colocated's "
        f"{colocated[rate]:.1f} ({split[rate] / colocated[rate]:.2f}x){against}: its {split['slower_pool']} pool "
        "bounds "
        f"it ({split['prefill_rows_per_s']:.2f} prefill against {split['decode_rows_per_s']:.2f} decode rows/s while "
        f"busy), busy {split['efficiency']:.0%} of the time; the handoff took "
        f"{split['kv_handoff_share_of_prefill'] or 0:.1%} of prefill"
    )


@dataclass(frozen=True)
class Verdict:
    chosen: Choice
    colocated: Choice
    split: Choice | None
    pays: str  # the verdict on the split, one line
    reasons: list[str]


def judge(
    choices: list[Choice],
    min_saving: float,
    identity: Identity,
    sides: dict[str, tuple[Planner, list[Option]]] | None = None,
    rows: dict | None = None,
) -> Verdict:
    """The choice among `choices` and the verdict on the split; with the planners that priced
    them (by basis: measured here, planned) and the bench's rows, why."""
    chosen, colocated, split = decide(choices, min_saving, identity.identical)
    if split is None:
        return Verdict(chosen, colocated, None, "no split fits the selected hardware", [])
    saving = 1 - split.forecast.usd / colocated.forecast.usd
    if not identity.identical:
        pays = (
            f"the split is not recommended: its tokens differ from colocated's on {len(identity.differing)} of "
            f"{identity.rows} rows"
        )
    elif chosen is split:
        pays = (
            f"the split pays: {split.hardware} at P:D {split.p_d} costs {saving:.0%} less than colocated on "
            f"{colocated.hardware} (${sig(split.forecast.usd)} against ${sig(colocated.forecast.usd)} for the "
            "whole job)"
        )
    else:
        pays = (
            f"the split does not pay: the cheapest, {split.hardware} at P:D {split.p_d} ({split.pools}), costs "
            f"${sig(split.forecast.usd)} against colocated's ${sig(colocated.forecast.usd)} for the whole job "
            f"({-saving:+.0%}; it should save {min_saving:.0%})"
        )
    reasons = []
    if sides is not None:
        planner, options = sides[colocated.basis]
        splits = [o for o in options if o.runnable and o.mode == "disaggregated"]
        best_split = min(splits, key=lambda o: o.usd_per_m_tokens) if splits else None
        if chosen is split:
            reasons = [phases(planner, options)]
        else:
            reasons = split_reasons(planner, colocated.option, best_split, options)
    return Verdict(chosen, colocated, split, pays, reasons + ([measured_split(rows)] if rows else []))
