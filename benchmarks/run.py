"""Benchmarks: load time, peak memory per rank and shim overhead, as ratios measured in one run.

    ./run.sh bench                      # = python benchmarks/run.py
    python benchmarks/run.py --repeats 5

Builds (once, under build/bench) MoE checkpoints of >= 200 MB, then measures, each in fresh processes over gloo
ranks on this machine's CPU:
  (a) EP-only load (no DeepSpeed) - the baseline
  (b) EP load with ZeRO-3 signalled, inside ep_zero3_compat()
  (c) dense ZeRO-3 load with zero.Init (no EP) - what users do otherwise
and reports (b)/(a) and (b)/(c) for wall time and peak RSS (min/median/max over repeats), (b)'s peak RSS against
the bytes a rank must hold, deepspeed.initialize + first step for DP x EP vs dense ZeRO-3, the in-process cost of
entering/leaving the block and of a wrapped function called outside it, and how (a)/(b) grow with ranks and
experts. Results: printed, and written to build/bench/results.json and benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "build" / "bench"
WORKER = Path(__file__).with_name("bench_worker.py")

# 32 experts x 2 layers of 512 x 768 SwiGLU experts: ~300 MB of fp32 weights, >95% of them experts.
SIZES = dict(hidden_size=512, num_layers=2, expert_size=768, vocab_size=1024, top_k=2)


def build(num_experts: int) -> Path:
    path = OUT / f"qwen3_moe-{num_experts}x"
    code = ("from ep_ds_shim.testing import build_tiny_moe\n"
            f"build_tiny_moe({str(path)!r}, 'qwen3_moe', num_experts={num_experts}, **{SIZES!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    return path


def checkpoint_bytes(path: Path) -> tuple[int, int]:
    """(dense bytes, expert bytes) from the safetensors headers."""
    dense = experts = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
            if "experts" in name.split(".")[:-1]:
                experts += nbytes
            else:
                dense += nbytes
    return dense, experts


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions")))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(variant: str, path: Path, nproc: int) -> dict:
    """One fresh torchrun job; returns the slowest rank's time and the largest per-rank peak RSS."""
    report = OUT / f"r-{variant}-{nproc}-{{rank}}.json"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", str(WORKER), variant, str(path), str(report)]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=1800)
    ranks = []
    for rank in range(nproc):
        file = Path(str(report).format(rank=rank))
        if file.exists():
            ranks.append(json.loads(file.read_text()))
            file.unlink()
    if len(ranks) != nproc:
        raise RuntimeError(f"{variant} on {nproc} ranks failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    merged = {"load_seconds": max(r["load_seconds"] for r in ranks),
              "anon_growth_mb": max(r["after_load_split"]["rss_anon_mb"] - r["baseline_split"]["rss_anon_mb"] for r in ranks),
              "file_growth_mb": max(r["after_load_split"]["rss_file_mb"] - r["baseline_split"]["rss_file_mb"] for r in ranks),
              "peak_rss_mb": max(r["load_peak_rss_mb"] for r in ranks),
              "load_delta_mb": max(r["load_peak_rss_mb"] - r["baseline_rss_mb"] for r in ranks),
              "held_param_mb": max(r["held_param_mb"] for r in ranks)}
    for key in ("initialize_seconds", "first_step_seconds", "step_peak_rss_mb"):
        if key in ranks[0]:
            merged[key] = max(r[key] for r in ranks)
    return merged


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratios(numerator: list[dict], denominator: list[dict], key: str) -> dict:
    """Per-repeat ratios (runs paired in the order they were measured, interleaved)."""
    return spread([n[key] / d[key] for n, d in zip(numerator, denominator)])


def shim_overhead(repeats: int = 2000) -> dict:
    """In-process: entering/leaving the block, and a wrapped function called outside any block."""
    code = f"""
import json, threading, timeit
import transformers.modeling_utils as modeling_utils
import ep_ds_shim
original = modeling_utils.is_deepspeed_zero3_enabled
with ep_ds_shim.ep_zero3_compat():
    pass  # first entry pays the one-time shape checks; measure the steady state below
hold, held = threading.Event(), threading.Event()
def holder():
    with ep_ds_shim.ep_zero3_compat():  # keeps the wrappers installed while this thread is outside the block
        held.set(); hold.wait()
enter_exit_cold = timeit.timeit(lambda: ep_ds_shim.ep_zero3_compat().__enter__().__exit__(None, None, None), number=20) / 20
thread = threading.Thread(target=holder); thread.start(); held.wait()
enter_exit_warm = min(timeit.repeat(lambda: ep_ds_shim.ep_zero3_compat().__enter__().__exit__(None, None, None), number={repeats}, repeat=5)) / {repeats}
wrapped = modeling_utils.is_deepspeed_zero3_enabled
assert wrapped is not original
n = 200000
unwrapped_ns = min(timeit.repeat(original, number=n, repeat=5)) / n * 1e9
wrapped_ns = min(timeit.repeat(wrapped, number=n, repeat=5)) / n * 1e9
hold.set(); thread.join()
print(json.dumps(dict(enter_exit_install_us=enter_exit_cold * 1e6, enter_exit_installed_us=enter_exit_warm * 1e6,
                      unwrapped_call_ns=unwrapped_ns, wrapped_call_outside_block_ns=wrapped_ns)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    base = build(32)
    double = build(64)
    dense_bytes, expert_bytes = checkpoint_bytes(base)
    print(f"checkpoint {base.name}: {(dense_bytes + expert_bytes) / 2**20:.0f} MB "
          f"(dense {dense_bytes / 2**20:.1f} MB, experts {expert_bytes / 2**20:.1f} MB)", flush=True)

    runs = {"ep_only": [], "ep_zero3": [], "dense_zero3": []}
    for repeat in range(args.repeats):  # interleaved, so drift in machine load hits every variant alike
        for variant in runs:
            runs[variant].append(measure(variant, base, 2))
            print(f"  repeat {repeat + 1}: {variant:<12} {runs[variant][-1]}", flush=True)
    steps = {"ep_zero3_step": [], "dense_zero3_step": []}
    for repeat in range(max(1, args.repeats - 1)):
        for variant in steps:
            steps[variant].append(measure(variant, base, 2))
            print(f"  repeat {repeat + 1}: {variant:<16} {steps[variant][-1]}", flush=True)
    scaling = {}
    for label, path, nproc in (("2 ranks, 32 experts", base, 2), ("4 ranks, 32 experts", base, 4),
                               ("2 ranks, 64 experts", double, 2)):
        for variant in ("ep_only", "ep_zero3"):
            result = runs[variant][0] if (path, nproc) == (base, 2) else measure(variant, path, nproc)
            scaling[f"{label} / {variant}"] = result
            print(f"  scaling {label:<20} {variant:<9} {result}", flush=True)

    must_hold_mb = (dense_bytes + expert_bytes / 2) / 2**20
    results = {
        "checkpoint_mb": (dense_bytes + expert_bytes) / 2**20,
        "must_hold_per_rank_mb": must_hold_mb,
        "load_time_b_over_a": ratios(runs["ep_zero3"], runs["ep_only"], "load_seconds"),
        "peak_rss_b_over_a": ratios(runs["ep_zero3"], runs["ep_only"], "peak_rss_mb"),
        "load_time_b_over_c": ratios(runs["ep_zero3"], runs["dense_zero3"], "load_seconds"),
        "peak_rss_b_over_c": ratios(runs["ep_zero3"], runs["dense_zero3"], "peak_rss_mb"),
        "load_delta_b_over_must_hold": spread([r["load_delta_mb"] / must_hold_mb for r in runs["ep_zero3"]]),
        "held_params_b_over_must_hold": spread([r["held_param_mb"] / must_hold_mb for r in runs["ep_zero3"]]),
        "anon_growth_b_over_must_hold": spread([r["anon_growth_mb"] / must_hold_mb for r in runs["ep_zero3"]]),
        "file_growth_b_mb": spread([r["file_growth_mb"] for r in runs["ep_zero3"]]),
        "absolute": {v: {k: spread([r[k] for r in rs]) for k in rs[0]} for v, rs in {**runs, **steps}.items()},
        "initialize_plus_first_step_dpxep_over_dense": spread(
            [(e["initialize_seconds"] + e["first_step_seconds"]) / (d["initialize_seconds"] + d["first_step_seconds"])
             for e, d in zip(steps["ep_zero3_step"], steps["dense_zero3_step"])]),
        "scaling": scaling,
        "overhead": shim_overhead(),
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results)
    (Path(__file__).with_name("results.md")).write_text(table)
    print(table)
    return 0


def render(r: dict) -> str:
    def f(s, unit=""):
        return f"{s['median']:.3f}{unit} ({s['min']:.3f}-{s['max']:.3f})"

    ab, o = r["absolute"], r["overhead"]
    lines = [
        f"Checkpoint: {r['checkpoint_mb']:.0f} MB (qwen3_moe, 32 experts); 2 gloo ranks on CPU; median (min-max).",
        "",
        "| measure | ratio | target |",
        "|---|---|---|",
        f"| load time, (b) EP+ZeRO-3 in block / (a) EP-only | {f(r['load_time_b_over_a'])} | <= 1.05 |",
        f"| peak RSS, (b) / (a) | {f(r['peak_rss_b_over_a'])} | <= 1.05 |",
        f"| load time, (b) / (c) dense ZeRO-3 zero.Init | {f(r['load_time_b_over_c'])} | - |",
        f"| peak RSS, (b) / (c) | {f(r['peak_rss_b_over_c'])} | - |",
        f"| (b) RSS growth during load / bytes a rank must hold ({r['must_hold_per_rank_mb']:.0f} MB) | {f(r['load_delta_b_over_must_hold'])} | close to 1 |",
        f"| (b) parameter bytes held / bytes a rank must hold | {f(r['held_params_b_over_must_hold'])} | 1 |",
        f"| (b) anonymous (heap) RSS growth after load / bytes a rank must hold | {f(r['anon_growth_b_over_must_hold'])} | close to 1 |",
        f"| (b) file-backed RSS growth after load (mmap'ed checkpoint pages), MB | {f(r['file_growth_b_mb'])} | - |",
        f"| deepspeed.initialize + first step, DP x EP / dense ZeRO-3 | {f(r['initialize_plus_first_step_dpxep_over_dense'])} | - |",
        "",
        "| absolute (slowest rank) | load s | peak RSS MB | initialize s | first step s |",
        "|---|---|---|---|---|",
    ]
    for variant, values in ab.items():
        cells = [f(values[k]) if k in values else "" for k in ("load_seconds", "peak_rss_mb", "initialize_seconds", "first_step_seconds")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| scaling (one run each) | load s | peak RSS MB | parameter MB held |",
        "|---|---|---|---|",
    ]
    for label, values in r["scaling"].items():
        lines.append(f"| {label} | {values['load_seconds']:.2f} | {values['peak_rss_mb']:.0f} | {values['held_param_mb']:.0f} |")
    lines += [
        "",
        "| shim overhead (in process) | value | target |",
        "|---|---|---|",
        f"| first enter+exit (installs the wrappers after the shape checks) | {o['enter_exit_install_us']:.0f} us | < 1 ms |",
        f"| enter+exit while installed | {o['enter_exit_installed_us']:.2f} us | < 1 ms |",
        f"| wrapped function called outside the block | {o['wrapped_call_outside_block_ns']:.0f} ns (unwrapped {o['unwrapped_call_ns']:.0f} ns: +{o['wrapped_call_outside_block_ns'] - o['unwrapped_call_ns']:.0f} ns) | < 1 us extra |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
