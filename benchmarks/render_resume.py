"""Table 6 of benchmarks/results.md: checkpoints of an EP engine, saved on 2 ranks and resumed in the same layout
(DeepSpeed's own load, the baseline) and on 4 ranks (the conversion to DeepSpeed's universal format + its load)."""

from __future__ import annotations

MB = 2**20


def _slowest(reports: list[dict], phase: str, measure: str):
    values = [report[phase][measure] for report in reports if phase in report]
    return max(values) if values else None


def _peak(reports: list[dict], phase: str) -> str:
    """The largest rank's peak RSS in the phase, and its growth over the RSS the phase started with."""
    largest = max((report for report in reports if phase in report), key=lambda report: report[phase]["peak_mb"])
    measured = largest[phase]
    return f"{measured['peak_mb']:.0f} (+{measured['peak_mb'] - measured['rss_before_mb']:.0f})"


def _save_ratio(reports: list[dict]) -> float:
    """The library's save over DeepSpeed's own, each the mean of its two saves (ABBA order)."""
    ours = (_slowest(reports, "save", "s") + _slowest(reports, "save_again", "s")) / 2
    theirs = (_slowest(reports, "deepspeed_save", "s") + _slowest(reports, "deepspeed_save_again", "s")) / 2
    return ours / theirs


def resume_lines(section: dict) -> list[str]:
    lines = [
        "Per model size: `engine.save_checkpoint` on 2 ranks (ep=2; DeepSpeed writes each rank's files, every file is "
        "flushed and digested, the record written, the tag put in place; against DeepSpeed's own `save_checkpoint` of "
        "the same state in the same job, both twice in ABBA order, the ratio of their means), then a new job resumes it: on 2 ranks (the "
        "layout that wrote it: each rank checks its files, then DeepSpeed's own load) and on 4 ranks (dp=2 x ep=2: the "
        "conversion to DeepSpeed's universal format by every rank, timed on its own, then the universal load, which "
        "checks its share of the conversion). Seconds of the slowest rank; peak RSS of the largest rank during the "
        "phase (in brackets: its growth over the RSS the phase started with); ratios against the same-layout resume "
        "of the same run.",
        "",
        "| model | save s | save / DeepSpeed's own save | save peak MB | checkpoint MB | resume, same layout s | peak MB "
        "| conversion s | conversion peak MB | conversion MB on disk | universal load s | peak MB | (conversion + load) "
        "/ same-layout resume |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in section.get("configs", []):
        save, same, other = config["save"], config["same_layout"], config["other_layout"]
        same_s = _slowest(same, "load", "s")
        convert_s, load_s = _slowest(other, "convert", "s"), _slowest(other, "load", "s")
        checkpoint = next((r.get("checkpoint_bytes") for r in save if r.get("checkpoint_bytes")), 0)
        converted = next((r.get("universal_bytes") for r in other if r.get("universal_bytes")), 0)
        lines.append(
            f"| {config['checkpoint']} ({config['bytes']['total'] / MB:.0f} MB) | {_slowest(save, 'save', 's'):.2f} "
            f"| {_save_ratio(save):.2f} | {_peak(save, 'save')} | {checkpoint / MB:.0f} | {same_s:.2f} | {_peak(same, 'load')} "
            f"| {convert_s:.2f} | {_peak(other, 'convert')} | {converted / MB:.0f} | {load_s:.2f} "
            f"| {_peak(other, 'load')} | {(convert_s + load_s) / same_s:.2f} |")
    steps = {config["checkpoint"]: sorted({r["step"] for r in config["other_layout"]}) for config in section.get("configs", [])}
    lines += ["", f"Every rank of every resumed job was at the saved step afterwards ({steps}) and trained one more step.",
              ""]
    return lines
