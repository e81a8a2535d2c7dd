"""`python -m ep_ds_shim doctor [--json]` and `python -m ep_ds_shim verify [...]` (under your launcher)."""

from __future__ import annotations

import argparse
import json
import sys

from . import doctor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ep_ds_shim")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor_parser = sub.add_parser("doctor", help="versions, imports, support, shape checks, environment")
    doctor_parser.add_argument("--json", action="store_true", help="machine-readable output")
    verify_parser = sub.add_parser(
        "verify", help="run under your launcher: EP load under ZeRO-3, a DP x EP step and an export, each compared "
                       "with a single-process model")
    verify_parser.add_argument("--model-type", action="append", dest="model_types",
                               help="a model type to check (repeatable; default: every MoE family with an EP plan)")
    verify_parser.add_argument("--model-dir", "--config", dest="model_dir", default=None,
                               help="your checkpoint (or its config.json's directory): check this architecture, "
                                    "shrunk to a tiny random model (no weights are read)")
    verify_parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    verify_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    verify_parser.add_argument("--work-dir", default=None, help="where tiny checkpoints and exports go")
    verify_parser.add_argument("--json", default=None, help="write each rank's results here ({rank} is replaced)")
    verify_parser.add_argument("--tolerance", type=float, default=None,
                               help="relative tolerance (default: 1e-5 on CPU, 1e-4 on CUDA)")
    verify_parser.add_argument("--verbose", action="store_true",
                               help="show what other libraries print (held back by default) and whole messages")
    verify_parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        report = doctor.diagnose()
        if args.json:
            json.dump(report, sys.stdout, indent=1, default=str)
            sys.stdout.write("\n")
        else:
            doctor.print_human(report)
        return 0 if report["ok"] else 1
    import os

    os.environ.setdefault("DS_ACCELERATOR", args.device)  # before DeepSpeed is imported, or it guesses (with a warning)
    from . import verify  # needs torch, transformers and DeepSpeed; the doctor must run without them

    return verify.main(args)


if __name__ == "__main__":
    sys.exit(main())
