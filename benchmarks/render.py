"""From build/bench/results.json to the tables of benchmarks/results.md (figures derived here, not in the jobs)."""

from __future__ import annotations

import os
import statistics

import common
import shim_timers

MB = 2**20
MICRO_TEXT = f"{common.MICRO} sequences x {common.SEQ} tokens"
LOAD_RATIO_TARGET = 1.05
FINGERPRINT_TARGET = 0.02


def machine() -> dict:
    with open("/proc/meminfo") as handle:
        total = int(handle.readline().split()[1]) / 2**20
    return {"cpus": os.cpu_count(), "memory_gib": round(total, 1), "load_average_at_start": os.getloadavg()}


# --- helpers ----------------------------------------------------------------------------------------------------


def fmt(stats: dict, digits: int = 3, scale: float = 1.0) -> str:
    if not stats:
        return "-"
    if stats.get("n", 1) == 1:
        return f"{stats['median'] * scale:.{digits}f}"
    return f"{stats['median'] * scale:.{digits}f} ({stats['min'] * scale:.{digits}f}-{stats['max'] * scale:.{digits}f})"


def mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def slowest(reports, *keys):
    values = []
    for report in reports:
        value = report
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return max(values) if values else None


def timer(phase: dict, name: str, measure: str = "s") -> float:
    """A direct timer's seconds in a phase (measure "cpu_s": the thread's CPU seconds)."""
    return phase.get("timers", {}).get(name, {}).get(measure, 0.0)


def round_verdict(ratio: dict, target: float = 1.0) -> str:
    """A per-round ratio against its target: met or missed only when every round agrees."""
    if ratio["max"] <= target:
        return "met (every round)"
    if ratio["min"] > target:
        return "missed (every round)"
    return f"undecided: rounds on both sides of {target:g} (median {ratio['median']:.2f})"


# --- table 1: shim vs AutoEP ------------------------------------------------------------------------------------


def side_metrics(reports: list[dict], reference: list[float]) -> dict:
    if reports == []:  # the job was not started (run.py: not enough free memory)
        return {"ok": False, "error": "not run: not enough free memory", "where": "run.py"}
    if not reports or any(r.get("status") == "fails" for r in reports) or any("steps" not in r for r in reports):
        failed = next((r for r in reports if r.get("status") == "fails"), {})
        return {"ok": False, "error": failed.get("error", "no report"), "where": failed.get("error_where")}
    losses = reports[0]["steps"]["losses"]
    steps = [r["steps"]["s"] for r in reports]
    metrics = {
        "ok": True,
        "losses": losses,
        "rank_loss_spread": max(abs(a - b) for r in reports for a, b in zip(r["steps"]["losses"], losses)),
        "dloss_first": abs(losses[0] - reference[0]),
        "dloss_1": abs(losses[1] - reference[1]) if len(losses) > 1 else None,
        "dloss_last": abs(losses[-1] - reference[len(losses) - 1]),
        "load_s": slowest(reports, "load", "s"),
        "load_peak_mb": slowest(reports, "load", "peak_mb"),
        "load_peak_per_rank_mb": [r["load"]["peak_mb"] for r in reports],
        "initialize_s": slowest(reports, "initialize", "s"),
        "initialize_peak_mb": slowest(reports, "initialize", "peak_mb"),
        "first_step_s": max(s[0] for s in steps),
        "steady_step_s": max(statistics.median(s[2:]) for s in steps) if len(steps[0]) >= 3 else None,
        "steady_step_cpu_s": max(statistics.median(r["steps"]["cpu_s"][2:]) for r in reports)
        if len(steps[0]) >= 3 and all("cpu_s" in r["steps"] for r in reports) else None,
        "steps_peak_mb": slowest(reports, "steps", "peak_mb"),
        "export": reports[0].get("export_probe"),
    }
    metrics["job_peak_mb"] = max(metrics["load_peak_mb"], metrics["initialize_peak_mb"], metrics["steps_peak_mb"])
    metrics["to_first_step_s"] = metrics["load_s"] + metrics["initialize_s"] + metrics["first_step_s"]
    return metrics


COMPARE_ROWS = [
    ("loss before any step, abs diff vs single process", "dloss_first", "e"),
    ("loss after 1 step, abs diff vs single process", "dloss_1", "e"),
    ("loss after the last step, abs diff vs single process", "dloss_last", "e"),
    ("load (from_pretrained) s", "load_s", "t"),
    ("peak RSS during load, MB (largest rank)", "load_peak_mb", "m"),
    ("deepspeed.initialize s", "initialize_s", "t"),
    ("peak RSS during initialize, MB", "initialize_peak_mb", "m"),
    ("first training step s", "first_step_s", "t"),
    ("steady-state step s (median of steps 3+)", "steady_step_s", "t"),
    ("steady-state step, CPU time s (largest rank)", "steady_step_cpu_s", "t"),
    ("peak RSS during training, MB", "steps_peak_mb", "m"),
    ("load + initialize + first step s", "to_first_step_s", "t"),
]


SIDE_NAMES = {"shim": "ep-ds-shim", "autoep-plain": "AutoEP", "autoep": "AutoEP",
              "autoep-plain-split": "AutoEP, batch split over ranks", "autoep-zinit": "AutoEP, zero.Init load",
              "autoep-zinit-split": "AutoEP, zero.Init load, batch split"}
SHORT = {"autoep-plain": "A", "autoep": "A", "autoep-plain-split": "A-split", "autoep-zinit": "A-zinit",
         "autoep-zinit-split": "A-zinit-split"}


def compare_tables(section: dict) -> tuple[list[str], dict]:
    lines, verdicts = [], {}
    main_env = section.get("main_env_autoep", {})
    if "reports" in main_env:  # one family (older results)
        main_env = {"qwen3_moe": main_env}
    for family, probe in main_env.items():
        reports = probe.get("reports") or []
        if not reports:
            lines.append(f"AutoEP ({family}) on this environment's release: no report (exit {probe.get('returncode')}).")
            continue
        r = reports[0]
        if r.get("status") == "fails":
            lines.append(f"AutoEP ({family}, `preset_model: {family}`) on this environment's transformers "
                         f"{r.get('transformers')}, re-measured in this run: **fails** in `deepspeed.{r.get('phase')}` "
                         f"with `{r.get('error')}` at `{r.get('error_where')}`.")
        else:
            lines.append(f"AutoEP ({family}) on this environment's transformers {r.get('transformers')}: "
                         f"{r.get('status')}.")
    if main_env:
        lines.append("")
    for size, run in section.get("runs", {}).items():
        reference = run["reference"]["losses"]
        sides = [k for k in run["rounds"][0] if k != "order"]
        sides = ["shim"] + [k for k in sides if k != "shim"]
        metrics = {side: [side_metrics(rnd[side], reference) for rnd in run["rounds"] if side in rnd] for side in sides}
        others = sides[1:]
        total = run["bytes"]["total"] / MB
        once = [SIDE_NAMES.get(s_, s_) for s_ in sides if sum(s_ in rnd for rnd in run["rounds"]) < len(run["rounds"])]
        lines.append(f"**{run['checkpoint']}** ({run.get('family', 'qwen3_moe')}): {total:.0f} MB, {run['steps']} "
                     f"steps, {len(run['rounds'])} round(s)" + (f" ({', '.join(once)}: first round only)" if once else "")
                     + f", transformers {section['transformers']}, 2 ranks, EP 2. The step's global batch is "
                     f"{MICRO_TEXT}: each shim rank trains on its own half of it, as does each AutoEP rank with "
                     "'batch split' (AutoEP's data-parallel use); plain 'AutoEP' gives every rank all of it (the "
                     "batch ep-ds-shim 0.2's EP group shared). Rounds alternate the order of the sides; median "
                     "(min-max) over rounds; ratios per round.")
        lines.append("")
        for side in others:
            failed = [a for a in metrics[side] if not a["ok"]]
            if failed:
                lines.append(f"{SIDE_NAMES.get(side, side)} failed: `{failed[0]['error']}` at `{failed[0]['where']}`")
                lines.append("")
        lines += ["| measure | " + " | ".join(SIDE_NAMES.get(s_, s_) for s_ in sides) + " | "
                  + " | ".join(f"shim / {SHORT.get(o, o)}" for o in others) + " |",
                  "|---|" + "---|" * (len(sides) + len(others))]
        pairs = {o: [] for o in others}
        for rnd in run["rounds"]:
            for o in others:
                if "shim" in rnd and o in rnd:
                    one, other = side_metrics(rnd["shim"], reference), side_metrics(rnd[o], reference)
                    if one["ok"] and other["ok"]:
                        pairs[o].append((one, other))
        for label, key, kind in COMPARE_ROWS:
            values = {side: [m[key] for m in metrics[side] if m["ok"] and m.get(key) is not None] for side in sides}
            if not any(values.values()):
                continue
            if kind == "e":
                cells = ["-" if not values[side] else f"{max(values[side]):.1e}" for side in sides]  # worst round
                lines.append(f"| {label} | " + " | ".join(cells) + " |" + " |" * len(others))
                continue
            digits = 0 if kind == "m" else 2
            ratios = [fmt(common.spread([a_[key] / b_[key] for a_, b_ in pairs[o] if a_.get(key) and b_.get(key)]), 2)
                      for o in others]
            lines.append(f"| {label} | " + " | ".join(fmt(common.spread(values[side]), digits) for side in sides)
                         + " | " + " | ".join(ratios) + " |")
        lines.append("")
        # the like-for-like side: AutoEP with the batch split over ranks, as the shim's ranks train
        base = next((o for o in others if o.endswith("-split")), others[0] if others else None)
        if base and pairs[base]:
            ratio = common.spread([a_["to_first_step_s"] / b_["to_first_step_s"] for a_, b_ in pairs[base]])
            word = round_verdict(ratio)
            verdicts[f"first trained step, {run['checkpoint']}"] = {
                "target": f"shim no slower than {SIDE_NAMES.get(base, base)} to a first trained step (load + "
                          "initialize + first step, ratio <= 1)", "value": ratio, "met": ratio["max"] <= 1.0,
                "verdict": word}
        exports = {m.get("export") for side in sides[1:] for m in metrics[side] if m["ok"] and m.get("export")}
        if exports:
            lines.append(f"AutoEP export probe (`engine.save_16bit_model`, ZeRO-3): `{exports.pop()}`")
            lines.append("")
    return lines, verdicts


# --- table 1b: ZeRO-3 sharding under EP (issue 18) ---------------------------------------------------------------

SHARD_NAMES = {"shim": "ep-ds-shim (this checkout)", "shim-0.2.0": "ep-ds-shim 0.2.0",
               "autoep-plain-split": "AutoEP, batch split over ranks"}
SHARD_SHORT = {"shim-0.2.0": "0.2.0", "autoep-plain-split": "A-split"}
DENSE_TARGET = 1.10  # dense state per rank within 10% of 1/world

SHARD_ROWS = [  # (label, metric, kind): e = abs diff, f = fraction, m = MB, t = seconds, n = count
    ("dense parameters held / whole (ds_tensor.numel() / ds_numel, largest rank)", "dense_fraction", "f"),
    ("dense parameters held whole on a rank (of all dense parameters)", "dense_whole_params", "n"),
    ("dense parameters held, MB", "dense_held_mb", "m"),
    ("dense optimizer state held (fp32 master + Adam moments), MB", "dense_optimizer_mb", "m"),
    ("... the same unpartitioned, MB", "dense_optimizer_full_mb", "m"),
    ("expert parameters held, MB", "expert_held_mb", "m"),
    ("optimizer state held, all parameters, MB", "optimizer_mb", "m"),
    ("peak RSS during load, MB (largest rank)", "load_peak_mb", "m"),
    ("peak RSS during initialize, MB", "initialize_peak_mb", "m"),
    ("peak RSS during training, MB", "steps_peak_mb", "m"),
    ("load (from_pretrained) s", "load_s", "t"),
    ("deepspeed.initialize s", "initialize_s", "t"),
    ("first training step s", "first_step_s", "t"),
    ("steady-state step s (median of steps 3+, slowest rank)", "steady_step_s", "t"),
    ("steady-state step, CPU time s (largest rank)", "steady_step_cpu_s", "t"),
    ("loss after the last step, abs diff vs single process", "dloss_last", "e"),
]


def shard_metrics(reports: list[dict], reference: list[float]) -> dict:
    """`side_metrics` (times, peaks, losses) plus the ZeRO-3 state of the rank holding the most."""
    metrics = side_metrics(reports, reference)
    if not metrics["ok"]:
        return metrics
    states = [r["zero3"] for r in reports if r.get("zero3")]
    if states:
        worst = max(states, key=lambda z: z["dense_fraction"] or 0)
        metrics.update(
            world=worst["world"], dense_params=worst["dense_params"],
            dense_fraction=max(z["dense_fraction"] for z in states),
            dense_whole_params=max(z["dense_whole_params"] for z in states),
            dense_held_mb=max(z["dense_held_bytes"] for z in states) / MB,
            dense_optimizer_mb=max(z["dense_optimizer_bytes"] for z in states) / MB,
            dense_optimizer_full_mb=max(z["dense_optimizer_full_bytes"] for z in states) / MB,
            expert_held_mb=max(z["expert_held_bytes"] for z in states) / MB,
            optimizer_mb=max(z["optimizer_bytes"] for z in states) / MB)
    return metrics


def dense_verdict(fraction: float, world: int) -> tuple[float, bool]:
    """The dense fraction a rank holds over 1/world, and whether it is within DENSE_TARGET of it."""
    over = fraction * world
    return over, over <= DENSE_TARGET


def _shard_cell(values: list, kind: str) -> str:
    if not values:
        return "-"
    if kind == "e":
        return f"{max(values):.1e}"
    if kind == "f":
        return f"{max(values):.3f}"
    if kind == "n":
        return f"{max(values):.0f}"
    return fmt(common.spread(values), 0 if kind == "m" else 2)


def shard_tables(section: dict) -> tuple[list[str], dict]:
    lines, verdicts = [], {}
    sequences = section.get("sequences")
    baseline = section.get("baseline", {})
    cpus = os.cpu_count() or 1
    for run in section.get("runs", []):
        total = run["bytes"]["total"] / MB
        dense = run["bytes"]["dense"] / MB
        ranks = run["ranks"]
        head = (f"**{run['checkpoint']}** ({total:.0f} MB, dense {dense:.0f} MB = {dense / total:.1%}), {ranks} ranks, "
                f"EP {ranks} (dp 1)")
        if run.get("skipped"):
            lines += [f"{head}: skipped ({run['skipped']}).", ""]
            continue
        reference = run["reference"]["losses"]
        sides = list(SHARD_NAMES)
        metrics = {side: [shard_metrics(rnd[side], reference) for rnd in run["rounds"] if rnd.get(side)]
                   for side in sides}
        others = [s_ for s_ in sides if s_ != "shim"]
        oversubscribed = ranks > cpus
        lines += [
            f"{head}, {run['steps']} steps, {len(run['rounds'])} round(s), transformers {section['transformers']}. "
            f"Every side trains on the same global batch per step, {sequences} sequences x {common.SEQ} tokens: "
            f"ep-ds-shim (this checkout) and AutoEP split it over the ranks ({sequences // ranks} "
            f"sequence{'s' if sequences // ranks != 1 else ''} each); "
            f"ep-ds-shim {baseline.get('version')} (commit {baseline.get('commit')}, its own environment) gives every "
            "rank of its EP group all of it (its contract: DeepSpeed got the layout's `mpu`, whose data-parallel "
            "group at dp 1 is the rank alone). One step is one global batch for every side, so step times compare "
            "per global batch. Memory is per rank after the steps (largest rank); the dense/expert split counts a "
            "parameter as an expert when DeepSpeed marks it a MoE parameter or it sits in an `experts` module. "
            "Median (min-max) over rounds; ratios per round (rounds alternate the order of the sides)."
            + (f" {ranks} ranks share {cpus} cores here: times are shown, not judged." if oversubscribed else ""),
            ""]
        for side in others:
            failed = [m for m in metrics[side] if not m["ok"]]
            if failed:
                lines += [f"{SHARD_NAMES[side]} failed: `{failed[0]['error']}` at `{failed[0]['where']}`", ""]
        missing = [SHARD_NAMES[s_] for s_ in sides if not metrics[s_]]
        if missing:
            lines += [f"Not measured (skipped: not enough free memory on the shared machine): {', '.join(missing)}.",
                      ""]
        pairs = {o: [] for o in others}
        for rnd in run["rounds"]:
            for o in others:
                if rnd.get("shim") and rnd.get(o):
                    one, other = shard_metrics(rnd["shim"], reference), shard_metrics(rnd[o], reference)
                    if one["ok"] and other["ok"]:
                        pairs[o].append((one, other))
        lines += ["| measure | " + " | ".join(SHARD_NAMES[s_] for s_ in sides) + " | "
                  + " | ".join(f"shim / {SHARD_SHORT[o]}" for o in others) + " |",
                  "|---|" + "---|" * (len(sides) + len(others))]
        for label, key, kind in SHARD_ROWS:
            values = {side: [m[key] for m in metrics[side] if m["ok"] and m.get(key) is not None] for side in sides}
            if not any(values.values()):
                continue
            ratios = [fmt(common.spread([a[key] / b[key] for a, b in pairs[o] if a.get(key) and b.get(key)]), 2)
                      if kind in ("m", "t") else "" for o in others]
            if key == "dense_whole_params":
                cells = [f"{max(values[s_]):.0f} of {metrics[s_][0]['dense_params']}" if values[s_] else "-"
                         for s_ in sides]
            else:
                cells = [_shard_cell(values[s_], kind) for s_ in sides]
            lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        lines.append("")
        name = f"{run['checkpoint']}, {ranks} ranks"
        shim = [m for m in metrics["shim"] if m["ok"] and m.get("dense_fraction") is not None]
        if shim:
            over, met = dense_verdict(max(m["dense_fraction"] for m in shim), ranks)
            verdicts[f"dense state per rank, {name}"] = {
                "target": f"within 10% of 1/world (held / whole x world <= {DENSE_TARGET:.2f})",
                "value": {"median": over, "min": over, "max": over, "n": 1}, "met": met}
        split = pairs.get("autoep-plain-split")
        if split and not oversubscribed:
            ratio = common.spread([a["steady_step_s"] / b["steady_step_s"] for a, b in split
                                   if a.get("steady_step_s") and b.get("steady_step_s")])
            if ratio:
                verdicts[f"steady-state step, {name}"] = {
                    "target": "shim no slower than AutoEP with the batch split over ranks (ratio <= 1)",
                    "value": ratio, "met": ratio["max"] <= 1.0, "verdict": round_verdict(ratio)}
            cpu = common.spread([a["steady_step_cpu_s"] / b["steady_step_cpu_s"] for a, b in split
                                 if a.get("steady_step_cpu_s") and b.get("steady_step_cpu_s")])
            if cpu:  # what the step costs a rank, without the waits for cores and for the other rank
                verdicts[f"steady-state step CPU time, {name}"] = {
                    "target": "shim / AutoEP split, the same in CPU seconds (largest rank; not waiting)",
                    "value": cpu, "met": cpu["max"] <= 1.0, "verdict": round_verdict(cpu)}
    return lines, verdicts


# --- tables 2 and 3: realistic size and growth ------------------------------------------------------------------


def growth_metrics(config: dict) -> dict:
    reports = config["reports"]
    ranks = config["ranks"]
    dense, experts = config["bytes"]["dense"], config["bytes"]["experts"]
    must_hold = (dense + experts / ranks) / MB  # ep = ranks here (dp = 1)
    per_rank = []
    for r in reports:
        load = r["load"]
        fingerprints = timer(load, "fingerprints")
        verifies = [r[k] for k in ("verify0", "verify1", "verify2", "verify") if k in r]
        per_rank.append({
            "load_s": load["s"],
            "load_peak_mb": load["peak_mb"],
            "load_growth_mb": load["peak_mb"] - load["rss_before_mb"],
            "anon_growth_mb": load["anon_after_mb"] - load["anon_before_mb"],
            "file_growth_mb": load["file_after_mb"] - load["file_before_mb"],
            "held_mb": r["held_after_load_mb"],
            "fingerprints_s": fingerprints,
            "shim_self_s": shim_timers.shim_self_seconds(load.get("timers", {})),
            "initialize_s": r["initialize"]["s"],
            "verify_s": statistics.median(v["s"] for v in verifies),
            "verify_fingerprints_s": statistics.median(timer(v, "fingerprints") for v in verifies),
            # the same in CPU seconds: what the checks cost, even while a rank waits for a core (4 ranks on 2)
            "load_cpu_s": load["cpu_s"],
            "fingerprints_cpu_s": timer(load, "fingerprints", "cpu_s"),
            "verify_cpu_s": statistics.median(v["cpu_s"] for v in verifies),
        })
    load_s = max(p["load_s"] for p in per_rank)
    model_mb = (dense + experts) / MB
    return {
        "size": config["size"], "checkpoint": config["checkpoint"], "ranks": ranks, "model_mb": model_mb,
        "must_hold_mb": must_hold, "per_rank": per_rank, "load_s": load_s,
        "load_peak_mb": max(p["load_peak_mb"] for p in per_rank),
        "peak_over_must_hold": max(p["load_peak_mb"] for p in per_rank) / must_hold,
        "growth_over_must_hold": max(p["load_growth_mb"] for p in per_rank) / must_hold,
        "anon_over_must_hold": max(p["anon_growth_mb"] for p in per_rank) / must_hold,
        "file_growth_mb": max(p["file_growth_mb"] for p in per_rank),
        "held_over_must_hold": max(p["held_mb"] for p in per_rank) / must_hold,
        "fingerprints_ms": 1e3 * max(p["fingerprints_s"] for p in per_rank),
        "verify_ms": 1e3 * max(p["verify_s"] for p in per_rank),
        "integrity_share": max((p["fingerprints_cpu_s"] + p["verify_cpu_s"]) / p["load_cpu_s"] for p in per_rank),
        "integrity_share_wall": max((p["fingerprints_s"] + p["verify_s"]) / p["load_s"] for p in per_rank),
        "shim_self_ms": 1e3 * max(p["shim_self_s"] for p in per_rank),
        "initialize_s": max(p["initialize_s"] for p in per_rank),
    }


GROWTH_ROWS = [
    ("bytes a rank must hold, MB", "must_hold_mb", "{:.0f}"),
    ("load s (slowest rank)", "load_s", "{:.2f}"),
    ("peak RSS at load, MB (largest rank)", "load_peak_mb", "{:.0f}"),
    ("fingerprints at load, ms", "fingerprints_ms", "{:.0f}"),
    ("verify_expert_integrity, ms", "verify_ms", "{:.0f}"),
    ("fingerprints + verify, % of load (CPU s / CPU s)", "integrity_share", "{:.1%}"),
    ("fingerprints + verify, % of load (wall)", "integrity_share_wall", "{:.1%}"),
    ("deepspeed.initialize (ep_ds_shim.initialize) s", "initialize_s", "{:.2f}"),
]


def growth_tables(section: dict) -> tuple[list[str], dict, list[dict]]:
    metrics = [growth_metrics(c) for c in section.get("configs", [])]
    if not metrics:
        return [], {}, []
    lines, verdicts = [], {}
    sizes = list(dict.fromkeys(m["size"] for m in metrics))
    first = [m for m in metrics if m["size"] == sizes[0]]
    lines += [f"**Table 2, {first[0]['checkpoint']}** ({first[0]['model_mb']:.0f} MB, "
              f"{first[0]['model_mb'] / 1024:.2f} GiB): EP over all ranks, ZeRO-3 signalled, one job per rank count; "
              "per rank. 'to hold' = dense weights + experts / ranks. verify = `verify_expert_integrity` after "
              "`ep_ds_shim.initialize` (median of 3 calls; it exchanges verdicts through the store, so it includes "
              "waiting for the slowest rank). The share of the load is given in CPU seconds (the checks' CPU time "
              "over the load's), and in wall seconds in brackets: a few milliseconds of wall time include waiting for a core "
              "(4 ranks share 2 here) and for the other ranks.", "",
              "| ranks | rank | load s | peak RSS at load MB | to hold MB | peak / to hold | RSS growth / to hold "
              "| anonymous growth / to hold | params held / to hold | fingerprints at load ms | verify ms (fingerprints) "
              "| (fingerprints + verify) / load, CPU (wall) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in first:
        for rank, p in enumerate(m["per_rank"]):
            hold = m["must_hold_mb"]
            lines.append(
                f"| {m['ranks']} | {rank} | {p['load_s']:.2f} | {p['load_peak_mb']:.0f} | {hold:.0f} "
                f"| {p['load_peak_mb'] / hold:.2f} | {p['load_growth_mb'] / hold:.2f} | {p['anon_growth_mb'] / hold:.2f} "
                f"| {p['held_mb'] / hold:.3f} | {1e3 * p['fingerprints_s']:.0f} "
                f"| {1e3 * p['verify_s']:.0f} ({1e3 * p['verify_fingerprints_s']:.0f}) "
                f"| {(p['fingerprints_cpu_s'] + p['verify_cpu_s']) / p['load_cpu_s']:.1%} "
                f"({(p['fingerprints_s'] + p['verify_s']) / p['load_s']:.1%}) |")
    lines += ["", "The export is measured in its own section (5).", ""]
    for m in metrics:
        verdicts[f"fingerprints + integrity check, {m['checkpoint']}, {m['ranks']} ranks"] = {
            "target": "<= 2% of load time (CPU seconds)",
            "value": {"median": m["integrity_share"], "min": m["integrity_share"], "max": m["integrity_share"], "n": 1},
            "met": m["integrity_share"] <= FINGERPRINT_TARGET}
    # table 3
    if len(sizes) >= 2:
        ranks = sorted({m["ranks"] for m in metrics})
        cell = {(m["size"], m["ranks"]): m for m in metrics}
        header = [f"{s.split('-')[-1]} experts, {r} ranks" for s in sizes[:2] for r in ranks[:2]]
        lines += [f"**Table 3, cost growth**: {sizes[0]} ({first[0]['model_mb']:.0f} MB) vs {sizes[1]} "
                  f"({cell[(sizes[1], ranks[0])]['model_mb']:.0f} MB, same expert size); one job each.", "",
                  "| figure | " + " | ".join(header) + " | x2 experts | x2 ranks |", "|---|" + "---|" * (len(header) + 2)]
        sentences = []
        for label, key, form in GROWTH_ROWS:
            values = [cell.get((s, r), {}).get(key) for s in sizes[:2] for r in ranks[:2]]
            if any(v is None for v in values):
                continue
            experts_factor = statistics.mean([values[2] / values[0], values[3] / values[1]]) if values[0] and values[1] else None
            ranks_factor = statistics.mean([values[1] / values[0], values[3] / values[2]]) if values[0] and values[2] else None
            lines.append(f"| {label} | " + " | ".join(form.format(v) for v in values)
                         + f" | x{experts_factor:.2f} | x{ranks_factor:.2f} |")
            sentences.append((label, experts_factor, ranks_factor))
        lines.append("")
        for label, e, r in sentences:
            lines.append(f"- {label}: x{e:.2f} with twice the experts, x{r:.2f} with twice the ranks "
                         f"({describe(e, r)}).")
        lines.append("")
    return lines, verdicts, metrics


# --- table 5: the export -------------------------------------------------------------------------------------------

EXPORT_HEADING = "### 5. Export: streamed and written by every rank, against gathering to rank 0"
EXPORT_BOUND_MARGIN = 1.1  # issue 22: peak RSS growth <= max_shard_size + the largest tensor + 10%
EXPORT_STEPS = ("export: transfers", "export: conversion", "export: writing", "export: verification",
                "export: move into place")


def export_metrics(config: dict) -> dict:
    """Per rank, over the configuration's jobs (one with each export first): the median seconds, the largest growth."""
    runs = config.get("runs") or [{"order": config.get("order"), "reports": config["reports"]}]
    plan = runs[0]["reports"][0]["export_plan"]
    bound_mb = (plan["max_shard_size"] + plan["largest_tensor"]) / MB
    per_rank = []
    for rank in range(len(runs[0]["reports"])):
        reports = [run["reports"][rank] for run in runs]
        streams, previous = [r["export_stream"] for r in reports], [r["export_previous"] for r in reports]
        per_rank.append({
            "stream_s": statistics.median(p["s"] for p in streams),
            "previous_s": statistics.median(p["s"] for p in previous),
            "stream_growth_mb": max(p["peak_mb"] - p["rss_before_mb"] for p in streams),
            "previous_growth_mb": max(p["peak_mb"] - p["rss_before_mb"] for p in previous),
            "steps": {name: statistics.median(p.get("timers", {}).get(name, {}).get("s", 0.0) for p in streams)
                      for name in EXPORT_STEPS},
        })
    return {"size": config["size"], "checkpoint": config["checkpoint"], "ranks": config["ranks"],
            "model_mb": config["bytes"]["total"] / MB, "plan": plan, "bound_mb": bound_mb, "per_rank": per_rank,
            "jobs": len(runs),
            # the slowest rank of each job, then the median over jobs
            "stream_s": statistics.median(max(r["export_stream"]["s"] for r in run["reports"]) for run in runs),
            "previous_s": statistics.median(max(r["export_previous"]["s"] for r in run["reports"]) for run in runs),
            "stream_runs": [max(r["export_stream"]["s"] for r in run["reports"]) for run in runs],
            "previous_runs": [max(r["export_previous"]["s"] for r in run["reports"]) for run in runs],
            "stream_growth_mb": max(p["stream_growth_mb"] for p in per_rank),
            "previous_growth_mb": max(p["previous_growth_mb"] for p in per_rank),
            "identical": all(run["reports"][0].get("exports_identical", {}).get("identical") for run in runs)}


def export_tables(section: dict) -> tuple[list[str], dict]:
    metrics = [export_metrics(c) for c in section.get("configs", [])]
    if not metrics:
        return [], {}
    fraction = section.get("shard_fraction", 8)
    lines = [f"max_shard_size = 1/{fraction} of the model. Two jobs per size and rank count, one with each export first "
             "(the page cache is flushed before each); per rank: the median seconds and the largest peak RSS growth "
             "during the call (the kernel's high-water mark, reset before it), against the bound max_shard_size + the "
             "largest tensor. 'stream' = `ep_ds_shim.save_pretrained`; 'previous' = the whole state dict gathered to "
             "global rank 0 and written there by transformers' `save_pretrained` (what it did before). The stream's "
             "steps are its own timers (transfers: every rank's partitions sent to the writers; conversion: "
             "transformers' reverse conversion; writing: safetensors; verification + move: global rank 0).", "",
             "| model | ranks | rank | stream s | previous s | stream / previous | stream growth MB | bound MB "
             "| growth / bound | previous growth MB | transfers s | conversion s | writing s | verification + move s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        for rank, p in enumerate(m["per_rank"]):
            steps = p["steps"]
            lines.append(
                f"| {m['checkpoint']} ({m['model_mb']:.0f} MB) | {m['ranks']} | {rank} | {p['stream_s']:.2f} "
                f"| {p['previous_s']:.2f} | {p['stream_s'] / p['previous_s']:.2f} | {p['stream_growth_mb']:.0f} "
                f"| {m['bound_mb']:.0f} | {p['stream_growth_mb'] / m['bound_mb']:.2f} | {p['previous_growth_mb']:.0f} "
                f"| {steps['export: transfers']:.2f} | {steps['export: conversion']:.2f} "
                f"| {steps['export: writing']:.2f} "
                f"| {steps['export: verification'] + steps['export: move into place']:.2f} |")
    lines.append("")
    verdicts = {}
    by_size: dict[str, list[dict]] = {}
    for m in metrics:
        by_size.setdefault(m["size"], []).append(m)
        runs = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
        lines.append(f"- {m['checkpoint']}, {m['ranks']} ranks: {m['plan']['shards']} shards; the largest rank's "
                     f"growth {m['stream_growth_mb']:.0f} MB = {m['stream_growth_mb'] / m['model_mb']:.2f}x the model "
                     f"(previous, rank 0: {m['previous_growth_mb']:.0f} MB = "
                     f"{m['previous_growth_mb'] / m['model_mb']:.2f}x); slowest rank per job {runs(m['stream_runs'])} s "
                     f"(previous {runs(m['previous_runs'])} s); both exports "
                     + ("hold identical tensors" if m["identical"] else "DIFFER") + ".")
        worst = max(p["stream_growth_mb"] / m["bound_mb"] for p in m["per_rank"])
        verdicts[f"export peak RSS growth, every rank, {m['checkpoint']}, {m['ranks']} ranks"] = {
            "target": f"<= (max_shard_size + largest tensor) x {EXPORT_BOUND_MARGIN}",
            "value": {"median": worst, "min": worst, "max": worst, "n": 1},
            "met": worst <= EXPORT_BOUND_MARGIN}
        verdicts[f"export holds the same tensors as the previous one, {m['checkpoint']}, {m['ranks']} ranks"] = {
            "target": "bit-identical", "value": {"median": 1.0 if m["identical"] else 0.0, "min": 0, "max": 1, "n": 1},
            "met": m["identical"], "verdict": "identical" if m["identical"] else "differ"}
    for size, group in by_size.items():
        group = sorted(group, key=lambda m: m["ranks"])
        if len(group) >= 2:
            factor = group[-1]["stream_s"] / group[0]["stream_s"]
            lines.append(f"- {group[0]['checkpoint']}: export time x{factor:.2f} from {group[0]['ranks']} to "
                         f"{group[-1]['ranks']} ranks (previous: x{group[-1]['previous_s'] / group[0]['previous_s']:.2f}).")
            verdicts[f"export time, {group[0]['checkpoint']}, {group[0]['ranks']} -> {group[-1]['ranks']} ranks"] = {
                "target": "falls as ranks are added (ratio < 1)",
                "value": {"median": factor, "min": factor, "max": factor, "n": 1}, "met": factor < 1}
    lines.append("")
    return lines, verdicts


def describe(experts: float, ranks: float) -> str:
    def word(f):
        if f > 1.6:
            return "about proportional"
        if f > 1.15:
            return "sub-linear"
        if f >= 0.87:
            return "flat"
        if f > 0.6:
            return "shrinks"
        return "about halves"
    return f"{word(experts)} in experts, {word(ranks)} in ranks"


# --- table 4: shim load / EP-only load --------------------------------------------------------------------------


def load_pairs(section: dict) -> dict:
    """Per (A, B) pair of consecutive measured loads in a job: the slowest rank's time of each, their ratio, the
    peak RSS ratio, and the shim's own time in B (directly timed)."""
    out = {"ratio": [], "cpu_ratio": [], "peak_ratio": [], "a_s": [], "b_s": [], "shim_self_s": [], "a_peak": [],
           "b_peak": [], "timers": []}
    for job in section["jobs"]:
        reports = job["reports"]
        count = len(reports[0]["loads"])
        loads = []
        for i in range(count):
            entries = [r["loads"][i] for r in reports]
            if entries[0]["warmup"]:
                continue
            timers: dict[str, float] = {}
            for e in entries:
                for name, value in e["load"]["timers"].items():
                    timers[name] = max(timers.get(name, 0.0), value["s"])
            loads.append({"variant": entries[0]["variant"], "s": max(e["load"]["s"] for e in entries),
                          "cpu": sum(e["load"].get("cpu_s", 0.0) for e in entries),
                          "peak": max(e["load"]["peak_mb"] for e in entries),
                          "self": max(shim_timers.shim_self_seconds(e["load"]["timers"]) for e in entries),
                          "timers": timers})
        for first, second in zip(loads[0::2], loads[1::2]):
            a, b = (first, second) if first["variant"] == "A" else (second, first)
            out["ratio"].append(b["s"] / a["s"])
            if a["cpu"]:
                out["cpu_ratio"].append(b["cpu"] / a["cpu"])
            out["peak_ratio"].append(b["peak"] / a["peak"])
            out["a_s"].append(a["s"])
            out["b_s"].append(b["s"])
            out["a_peak"].append(a["peak"])
            out["b_peak"].append(b["peak"])
            out["shim_self_s"].append(b["self"])
            out["timers"].append(b["timers"])
    return out


def _verdict(stats: dict) -> tuple[str, bool]:
    """Decided only when the median's 95% CI is on one side of the target."""
    if stats["ci_high"] <= LOAD_RATIO_TARGET:
        return "met", True
    if stats["ci_low"] > LOAD_RATIO_TARGET:
        return "missed", False
    return (f"at the target, undecided: the 95% CI {stats['ci_low']:.3f}-{stats['ci_high']:.3f} contains 1.05",
            stats["median"] <= LOAD_RATIO_TARGET)


def ratio_table(section: dict) -> tuple[list[str], dict]:
    if not section.get("jobs"):
        return [], {}
    pairs = load_pairs(section)
    ratio = common.spread(pairs["ratio"])
    peak = common.spread(pairs["peak_ratio"])
    cpu = common.spread(pairs["cpu_ratio"])
    a_s, b_s = common.spread(pairs["a_s"]), common.spread(pairs["b_s"])
    own = common.spread(pairs["shim_self_s"])
    predicted = common.spread([1 + s / a for s, a in zip(pairs["shim_self_s"], pairs["a_s"])])
    verdict, met = _verdict(ratio)
    names = sorted({k for t in pairs["timers"] for k in t}, key=lambda k: -statistics.median(t.get(k, 0) for t in pairs["timers"]))
    breakdown = ", ".join(f"{k} {1e3 * statistics.median(t.get(k, 0.0) for t in pairs['timers']):.1f}"
                          for k in names if statistics.median(t.get(k, 0.0) for t in pairs["timers"]) >= 5e-4)
    total = section["bytes"]["total"] / MB
    lines = [
        f"**Table 4, {section['checkpoint']}** ({total:.0f} MB), 2 ranks: A = EP-only load (no DeepSpeed, no shim), "
        "B = EP load with ZeRO-3 signalled inside `ep_zero3_compat()`. Loads alternate ABBA / BAAB inside the same "
        f"processes ({len(section['jobs'])} jobs, {ratio['n']} pairs, stopped: {section.get('stopped')}); before "
        "each load the checkpoint is read into the page cache and the heap returned to the OS. Slowest rank per "
        "load; median (min-max), [95% CI of the median].",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| load time B / A | {fmt(ratio)} [{ratio['ci_low']:.3f}-{ratio['ci_high']:.3f}] | <= 1.05: **{verdict}** |",
        f"| CPU time B / A (all ranks' process CPU time: insensitive to waiting for other jobs) | {fmt(cpu)} "
        f"[{cpu.get('ci_low', 0):.3f}-{cpu.get('ci_high', 0):.3f}] | |",
        f"| peak RSS B / A | {fmt(peak)} | <= 1.05: **{'met' if peak['median'] <= 1.05 else 'missed'}** |",
        f"| A: EP-only load s | {fmt(a_s)} | |",
        f"| B: shim's load s | {fmt(b_s)} | |",
        f"| shim's own time in B, timed directly, ms | {fmt(own, 1, 1e3)} | |",
        f"| cross-check: 1 + own time / A | {fmt(predicted)} | |",
        "",
        f"Shim's own time per load, median ms over pairs (slowest rank; inclusive timers nest inside `self: entry`): "
        f"{breakdown}.",
        "",
    ]
    return lines, {"load time, shim / EP-only": {"target": "<= 1.05", "value": ratio, "met": met, "verdict": verdict},
                   "load CPU time, shim / EP-only": {"target": "<= 1.05", "value": cpu,
                                                      "met": bool(cpu) and cpu["ci_high"] <= LOAD_RATIO_TARGET,
                                                      "verdict": _verdict(cpu)[0] if cpu else "not measured"},
                   "peak RSS, shim / EP-only": {"target": "<= 1.05", "value": peak, "met": peak["median"] <= 1.05}}


# --- profile ----------------------------------------------------------------------------------------------------


def profile_entries(path) -> dict:
    """The shim's functions in a cProfile dump (cumulative time), and what `Fingerprint.of` spends its time in."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    out = {"shim": [], "fingerprint_callees": [], "from_pretrained_s": None}
    of_key = None
    for (file, line, func), (cc, nc, tt, ct, callers) in stats.items():
        short = f"{file.split('/ep_ds_shim/')[-1]}:{line}({func})" if "/ep_ds_shim/" in file else None
        if short and ct >= 0.002 and not func.startswith("<"):
            out["shim"].append({"where": "ep_ds_shim/" + short, "calls": nc, "tottime": tt, "cumtime": ct})
        if "/ep_ds_shim/experts.py" in file and func == "of":
            of_key = (file, line, func)
        if func == "from_pretrained" and "auto_factory" in file:
            out["from_pretrained_s"] = ct
    if of_key:
        for key, (cc, nc, tt, ct, callers) in stats.items():
            if of_key in callers:
                c = callers[of_key]
                out["fingerprint_callees"].append({"what": key[2], "calls": c[1], "tottime": c[2], "cumtime": c[3]})
        out["fingerprint_self"] = stats[of_key][2]
    out["shim"].sort(key=lambda e: -e["cumtime"])
    out["fingerprint_callees"].sort(key=lambda e: -e["cumtime"])
    return out


def profile_lines(section: dict) -> list[str]:
    entries = section.get("entries", {})
    dump = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), section.get("file", "-"))
    if os.path.exists(dump):  # re-read, so a re-render applies the current selection
        entries = profile_entries(dump)
    shim = entries.get("shim", [])[:10]
    if not shim:
        return []
    lines = [f"cProfile of rank 0, {section['checkpoint']} on 2 ranks: EP load under ZeRO-3 inside the block, "
             "`ep_ds_shim.initialize`, 3 x `verify_expert_integrity` (`{}`); `from_pretrained` took {:.2f} s "
             "cumulative.".format(section["file"], entries.get("from_pretrained_s") or 0), "",
             "| function (ep_ds_shim) | calls | own s | cumulative s |", "|---|---|---|---|"]
    wrappers = (("entry.py", "(from_pretrained)"), ("common.py", "(wrapper)"), ("zero3_question.py", "(answer)"),
                ("replica_mesh.py", "(build_meshes)"), ("handover.py", "(initialize)"))
    wraps = lambda where: any(f in where and where.endswith(n) for f, n in wrappers)  # noqa: E731
    lines += [f"| `{e['where']}`{' (includes the transformers / DeepSpeed call it wraps)' if wraps(e['where']) else ''} "
              f"| {e['calls']} | {e['tottime']:.3f} | {e['cumtime']:.3f} |" for e in shim]
    callees = entries.get("fingerprint_callees", [])
    if callees:
        lines += ["", "Inside `Fingerprint.of`: own code (the float64 weights `arange % 1009 + 1`, operators) "
                  f"{entries.get('fingerprint_self', 0):.3f} s; "
                  + "; ".join(f"`{c['what']}` {c['cumtime']:.3f} s ({c['calls']} calls)" for c in callees[:4]) + "."]
    return lines + [""]


# --- where a training step's time goes (BENCH_PROFILE_STEPS dumps) ------------------------------------------------

# (category, [(file suffix, or None for a builtin, function names), ...]): cumulative seconds of the matching entries.
C10D = "torch/distributed/distributed_c10d.py"
ENGINE = "deepspeed/runtime/engine.py"
STEP_CATEGORIES = [
    ("forward (engine)", [(ENGINE, ("forward",))]),
    ("backward (engine)", [(ENGINE, ("backward",))]),
    ("optimizer step (engine.step: ZeRO-3 gradient reductions, clipping, Adam)", [(ENGINE, ("step",))]),
    ("  Adam (torch.optim)", [("torch/optim/adam.py", ("adam",))]),
    ("  gradient norm (ZeRO-3)", [("deepspeed/runtime/zero/stage3.py", ("get_grad_norm_direct",))]),
    ("token all-to-all (c10d calls, functional collectives and their waits)", [
        (C10D, ("all_to_all_single", "all_to_all")),
        (None, ("<built-in method torch._ops._c10d_functional.all_to_all_single>",
                "<built-in method torch._ops._c10d_functional.wait_tensor>"))]),
    ("ZeRO-3 parameter all-gathers", [(C10D, ("all_gather_into_tensor", "all_gather", "_all_gather_base"))]),
    ("ZeRO-3 gradient reduce-scatters", [(C10D, ("reduce_scatter_tensor", "reduce_scatter", "_reduce_scatter_base"))]),
    ("all_reduce (losses, norms)", [(C10D, ("all_reduce",))]),
    ("c10d Work.wait (inside the synchronous c10d collectives above, and ZeRO-3's prefetches)",
     [(None, ("<built-in method torch._C._distributed_c10d.wait>",))]),
    ("host reads of tensors (.item / .tolist / .cpu)", [
        (None, ("<method 'item' of 'torch._C.TensorBase' objects>", "<method 'tolist' of 'torch._C.TensorBase' objects>",
                "<method 'cpu' of 'torch._C.TensorBase' objects>"))]),
]


def step_profile(stats: dict, steps: int) -> list[dict]:
    """Per training step: seconds and calls of each STEP_CATEGORIES entry in a cProfile `pstats.Stats(...).stats`
    dict of `steps` profiled steps (a category of several functions sums them; the collectives do not nest)."""
    out = []
    for label, matchers in STEP_CATEGORIES:
        seconds = calls = 0
        for (file, _line, func), (_cc, nc, _tt, ct, _callers) in stats.items():
            if any(func in names and (file.endswith(suffix) if suffix else file == "~") for suffix, names in matchers):
                seconds += ct
                calls += nc
        out.append({"what": label, "s": seconds / steps, "calls": calls / steps})
    return out


def step_profile_lines(section: dict) -> list[str]:
    profiles = section.get("step_profiles") or {}
    if not profiles:
        return []
    import pstats

    sides = [s_ for s_ in SHARD_NAMES if s_ in profiles]
    columns = {}
    for side in sides:
        entry = profiles[side]
        path = entry["file"]
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if os.path.exists(path):
            columns[side] = {e["what"]: e for e in step_profile(pstats.Stats(path).stats, entry["steps"])}
    if not columns:
        return []
    first = profiles[sides[0]]
    clock = first.get("clock", "wall")
    lines = [f"Where a steady-state step goes: cProfile of rank 0 (`BENCH_PROFILE_STEPS`, {clock} clock), "
             f"{first['checkpoint']}, {first['ranks']} ranks, {first['steps']} steps profiled after 2 unprofiled ones, "
             "one job per side; seconds per step (calls per step). "
             + ("CPU seconds of the process (its gloo threads included): the work, without waiting for a core or "
                "for the other rank." if clock == "cpu" else
                "Wall seconds: collectives include waiting for the other rank.") + " Categories may nest (the "
             "engine's forward, backward and step contain the rest).", "",
             "| where | " + " | ".join(SHARD_NAMES[s_] for s_ in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, _matchers in STEP_CATEGORIES:
        cells = [columns[s_][label] for s_ in columns]
        if not any(c["calls"] for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(f"{c['s']:.3f} ({c['calls']:.0f})" for c in cells) + " |")
    return lines + [""]


# --- the document -----------------------------------------------------------------------------------------------


# Each section's heading in results.md: a section a run leaves out is carried over from the previous file under it.
HEADINGS = {
    "compare": "### 1. ep-ds-shim vs DeepSpeed AutoEP (same checkpoint, ranks, batches)",
    "shard": "### 1b. ZeRO-3 sharding under EP: this checkout vs ep-ds-shim 0.2.0 vs AutoEP, batch split",
    "growth": "### 2-3. Realistic size and cost growth",
    "profile": "### Profile (where the shim's own time goes)",
    "ratio": "### 4. The shim's load vs the EP-only load",
    "export": EXPORT_HEADING,
    "resume": "### 6. Checkpoints: save, and resume in another layout",
    "overhead": "### Block overhead (in process)",
}
MEASURED_BY = "Measured by: "


def measured_by(results: dict) -> str:
    m = results.get("machine", {})
    return (f"{MEASURED_BY}`{results.get('command')}` ({results.get('mode')} run), {results.get('date')}; "
            f"{m.get('cpus')} CPUs, {m.get('memory_gib')} GiB, gloo, DS_ACCELERATOR=cpu, one thread per rank; load "
            f"average at start {', '.join(f'{x:.1f}' for x in m.get('load_average_at_start', []))}; took "
            f"{results.get('seconds', 0) / 60:.1f} min.")


def previous_blocks(text: str) -> dict[str, list[str]]:
    """The sections of a previous results.md, by key: each from its heading to the next heading, with the line that
    says which run measured it (a file from before these lines existed: its one header line)."""
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith(("Command: ", MEASURED_BY))), None)
    starts = [i for i, line in enumerate(lines) if line.startswith("### ")] + [len(lines)]
    blocks = {}
    for start, end in zip(starts, starts[1:]):
        key = next((k for k, heading in HEADINGS.items() if lines[start] == heading), None)
        if key is None:
            continue
        body = lines[start + 1:end]
        if not any(line.startswith(MEASURED_BY) for line in body[:3]) and header:
            body = ["", MEASURED_BY + header.removeprefix("Command: ").removeprefix(MEASURED_BY)] + body
        blocks[key] = [lines[start], *body]
    return blocks


def _overhead_lines(o: dict) -> list[str]:
    return ["| measure | value | target |", "|---|---|---|",
            f"| first enter+exit (shape checks, installs the wrappers) | {o['enter_exit_install_us']:.0f} us | < 1 ms |",
            f"| enter+exit while installed | {o['enter_exit_installed_us']:.2f} us | < 1 ms |",
            f"| wrapped function called outside the block | {o['wrapped_call_outside_block_ns']:.0f} ns "
            f"(unwrapped {o['unwrapped_call_ns']:.0f} ns) | < 1 us extra |", ""]


def _resume_lines(section: dict) -> list[str]:
    from render_resume import resume_lines

    return resume_lines(section)


def _shard_section(section: dict) -> tuple[list[str], dict]:
    body, verdicts = shard_tables(section)
    return body + step_profile_lines(section), verdicts


def _growth_section(section: dict) -> tuple[list[str], dict]:
    body, verdicts, _ = growth_tables(section)
    return body, verdicts


def _without_targets(render):
    return lambda section: (render(section), {})


# Each section's table(s) and target verdicts, from its raw results.
RENDERERS = {
    "compare": compare_tables,
    "shard": _shard_section,
    "growth": _growth_section,
    "profile": _without_targets(profile_lines),
    "ratio": ratio_table,
    "export": export_tables,
    "resume": _without_targets(_resume_lines),
    "overhead": _without_targets(_overhead_lines),
}


def markdown(results: dict, previous: str = "") -> str:
    """results.md: the sections this run measured, and each one it left out as the previous file had it (under
    the line that says which run measured it), so a partial run never drops a table. Sections in HEADINGS order."""
    sections = results.get("sections", {})
    lines = [measured_by(results), ""]
    carried = {key: block for key, block in previous_blocks(previous).items() if key not in sections}
    if carried:
        lines += [f"Sections not run by this command ({', '.join(k for k in HEADINGS if k in carried)}) are as the "
                  "previous results had them, each under the line that says which run measured it.", ""]
    for key, heading in HEADINGS.items():
        if key in sections:
            body, verdicts = RENDERERS[key](sections[key])
            lines += [heading, "", measured_by(results), "", *body, *target_lines(verdicts)]
        elif key in carried:
            block = carried[key]
            lines += [*block, ""] if block[-1].strip() else block
    return "\n".join(lines)


def target_lines(verdicts: dict) -> list[str]:
    """A section's targets, at its end (so they travel with it when a later partial run carries it over)."""
    if not verdicts:
        return []
    lines = ["Targets:", "", "| target | measured | verdict |", "|---|---|---|"]
    for name, v in verdicts.items():
        value = v["value"]
        shown = f"{value['median']:.1%}" if "integrity" in name else fmt(value)
        word = v.get("verdict") or ("met" if v["met"] else "missed")
        lines.append(f"| {name}: {v['target']} | {shown} | **{word}** |")
    return lines + [""]
