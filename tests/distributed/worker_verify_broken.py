"""`python -m ep_ds_shim verify` with the shim deliberately broken, to show verify catches it.

    torchrun ... tests/distributed/worker_verify_broken.py expert-groups|gradient <verify arguments>

expert-groups: the expert shards never get DeepSpeed's expert tags or groups (the part that replaced 0.2's `mpu`),
    so ZeRO-3 treats them as dense weights of every rank;
gradient: every gradient below the output layer is scaled by 1 + 1e-3 on its way back (the forward is unchanged),
    a relative error of 1e-3 in gradients that otherwise match.
"""

from __future__ import annotations

import sys

import torch

import ep_ds_shim.verify.run as verify_run
from ep_ds_shim.__main__ import main
from ep_ds_shim.training import expert_groups


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 1e-3)


def _perturbing_initialize(initialize):
    def wrapped(*args, **kwargs):
        engine, *rest = initialize(*args, **kwargs)
        head = engine.module.get_output_embeddings()
        head.register_forward_pre_hook(lambda module, inputs: (_ScaleGradient.apply(inputs[0]), *inputs[1:]))
        return (engine, *rest)
    return wrapped


if __name__ == "__main__":
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "expert-groups":
        expert_groups.tag_expert_parameters = lambda model, ep_size: None
    elif mode == "gradient":
        verify_run.initialize = _perturbing_initialize(verify_run.initialize)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.exit(main(["verify", *argv]))
