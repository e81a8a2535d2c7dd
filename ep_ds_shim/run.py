"""Zero-edit activation: run an unmodified script with the shim on.

    torchrun --nproc_per_node 2 -m ep_ds_shim.run train.py --its --own --args
    accelerate launch -m ep_ds_shim.run train.py ...        deepspeed --module ep_ds_shim.run train.py ...

For the whole script: `ep_zero3_compat()` (EP loads under ZeRO-3 take the standard path; upstream's own spellings,
`DistributedConfig(tp_size=N, ep_size=N)` and `DistributedConfig(enable_expert_parallel=True)` + `device_mesh`, load
as EP with the dense layers whole) and `supply_deepspeed_groups()` (`deepspeed.initialize` on such a model gets
DeepSpeed's expert groups: dense weights partitioned over every rank, each expert shard over its replicas). The
integrity guard still checks the experts after `deepspeed.initialize`.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from .loading.block import ep_zero3_compat
from .training.launcher_groups import supply_deepspeed_groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ep_ds_shim.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-unverified", action="store_true", help="accept a transformers release newer than the verified range")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)

    sys.argv = [args.script, *args.script_args]
    with ep_zero3_compat(allow_unverified=args.allow_unverified), supply_deepspeed_groups():
        runpy.run_path(args.script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
