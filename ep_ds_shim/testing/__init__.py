"""Test support that ships with the package, because `python -m ep_ds_shim verify` uses it on users' machines too:
tiny MoE checkpoints built locally, of every family with an EP plan, and the fixed ones the project's own runs use
(`tiny_models`), the single-process oracle (`oracle`), and launching and collecting real multi-process jobs (`jobs`)."""

from .tiny_models import MODEL_TYPES, build_tiny_moe, tiny_config_kwargs
from .jobs import JobResult, free_port, job_env, run_job, run_nodes, torchrun, write_report
from .oracle import OPTIMIZER, batch_for, compare_step, expert_slice, full_grads, max_abs_diffs, reference_step

__all__ = [
    "MODEL_TYPES", "OPTIMIZER", "JobResult", "batch_for", "build_tiny_moe", "compare_step", "expert_slice", "free_port",
    "full_grads", "job_env", "max_abs_diffs", "reference_step", "run_job", "run_nodes", "tiny_config_kwargs",
    "torchrun", "write_report",
]
