"""The package's structure: every module imports on its own (no import order or cycle is needed to make it
work), importing it raises no warning of the package's own, and no module is over 500 lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ep_ds_shim

PACKAGE = Path(ep_ds_shim.__file__).parent
MODULES = sorted(
    ".".join(("ep_ds_shim", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)

# One fresh interpreter imports the third-party packages once, then forks a child per module: each child imports
# one ep_ds_shim module into an interpreter where no ep_ds_shim module is loaded yet, with warnings raised from
# the package's own modules turned into errors.
_FORK_EACH = r"""
import json, os, sys, warnings, importlib, traceback
import torch, transformers, transformers.modeling_utils, transformers.trainer, wrapt
results = {}
for module in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        warnings.filterwarnings("error", module=r"ep_ds_shim(\..*)?$")
        try:
            importlib.import_module(module)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    results[module] = os.waitpid(pid, 0)[1]
print(json.dumps(results))
"""


def test_every_module_imports_on_its_own_without_warnings():
    modules = MODULES
    assert len(modules) > 30, modules
    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, json.dumps(modules)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = [module for module, status in results.items() if status]
    assert not failures, (failures, proc.stderr[-4000:])
    assert set(results) == set(modules)


def test_the_alias_removed_in_0_3_is_gone():
    with pytest.raises(ModuleNotFoundError):
        import ep_ds_shim.hf_trainer  # noqa: F401


def test_public_api_resolves():
    for name in ep_ds_shim.__all__:
        assert getattr(ep_ds_shim, name) is not None, name
    with pytest.raises(AttributeError):
        ep_ds_shim.no_such_name  # noqa: B018


def test_no_module_is_over_500_lines():
    """Small modules, one job each (issue 23): a module past this has grown a second job; split it."""
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long


_SHIM_MODULES_LOADED = r"""
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(name for name in sys.modules if name.startswith("ep_ds_shim"))))
"""


@pytest.mark.parametrize("module", ["ep_ds_shim.loading", "ep_ds_shim.loading.block", "ep_ds_shim.loading.patches"])
def test_loading_imports_no_training_module(module):
    """The loading block depends on patching/, releases/ and the shared modules only: the training side is reached
    through one hook resolved on the first EP load (`loading.entry.TRAINING_HOOK`)."""
    proc = subprocess.run([sys.executable, "-c", _SHIM_MODULES_LOADED, module], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert module in loaded
    if module != "ep_ds_shim.loading":  # the block does load its own wrappers
        assert {"ep_ds_shim.loading.entry", "ep_ds_shim.patching.installer"} <= set(loaded)
    assert [name for name in loaded if name.startswith("ep_ds_shim.training")] == []


def test_the_training_hook_resolves():
    from ep_ds_shim.loading import entry
    from ep_ds_shim.training import deepspeed_ready

    assert entry._training_hook() is deepspeed_ready.adopt_ep_load
