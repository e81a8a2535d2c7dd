"""Holding back other libraries' floods inside `verify`'s own calls (``--verbose`` shows everything).

Measured on 2 CPU ranks over the 78 families of transformers 5.24: 1244 FutureWarnings from DeepSpeed's ZeRO-3
collectives (`all_gather_into_tensor` / `reduce_scatter_tensor`, deprecated in torch 2.13; they repeat at every step
because DeepSpeed's CPU accelerator runs a subprocess per gradient reduction, and Python forgets which warnings it
has shown whenever warning filters change, as `subprocess` does), transformers' loading progress bars and notices,
and DeepSpeed's INFO lines. None of them says anything about the result, and together they bury the table.

Held back: Python warnings (counted, the count printed), transformers' logging below ERROR and its progress bars,
DeepSpeed's logging below ERROR, and what DeepSpeed prints on stdout while it sets up its communication. Never held
back: errors, and `verify`'s own output. Everything is restored when the block ends.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter


@contextlib.contextmanager
def held_back(verbose: bool):
    """Yields a Counter that ends up holding how many warnings of each category were held back."""
    counts: Counter = Counter()
    if verbose:
        yield counts
        return
    from deepspeed.utils import logger as deepspeed_logger
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    deepspeed_level = deepspeed_logger.level
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    deepspeed_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield counts
            finally:
                counts.update(warning.category.__name__ for warning in caught)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
        deepspeed_logger.setLevel(deepspeed_level)


@contextlib.contextmanager
def stdout_held_back(verbose: bool):
    """What a library prints on stdout (DeepSpeed: "... built successfully" at every start)."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def first_run_notice(device: str) -> str | None:
    """On CPU, DeepSpeed compiles its shared-memory communication op the first time it starts (about a minute with
    the C++ compiler), then reuses it; say so before the wait, only when it is not built yet."""
    if device != "cpu":
        return None
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            return None
        directory = _get_build_directory(builder.NAME, verbose=False)
    except Exception:  # noqa: BLE001 - only a notice
        return None
    import os

    if os.path.exists(os.path.join(directory, f"{builder.NAME}.so")):
        return None
    return (f"first run: DeepSpeed compiles its CPU communication op ({builder.NAME}) with the C++ compiler, about a "
            f"minute, once; it is kept in {directory}")
