"""The target directory: checked before anything is gathered, written through a temporary sibling, and replaced
only once the export is complete and verified.

- The export is written into ``<parent>/.<name>.ep_ds_shim-export-<token>`` (same filesystem, so moving is a
  rename). A killed export leaves only that hidden sibling; the next export into the same target removes it.
- Into a target that does not exist, the whole sibling is renamed into place: the target appears complete or not
  at all.
- Into an existing directory, its model files are replaced wholesale, everything else in it is kept (a tokenizer,
  a README, sub-directories). Model files: the weights (`model*.safetensors`, `pytorch_model*.bin`), their index,
  `config.json` and `generation_config.json`. The order keeps it whole at every instant: first the files that make
  it load as a model (an index, or an unsharded weights file) are removed, then the other old model files, then the
  new shards and config are moved in, and the new index (or unsharded file) last. A crash in between leaves a
  directory `from_pretrained` refuses with a clear error (no weights), never old and new weights mixed; the
  complete new export is still in the sibling.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil

from ...log import logger

_SIBLING = ".{name}.ep_ds_shim-export-"
MARKER = ".ep_ds_shim-export"  # in the sibling: who made it, so every rank can check it sees the same directory
_WEIGHTS = re.compile(r"^(model|pytorch_model)(\..+)?(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
CONFIG_FILES = ("config.json", "generation_config.json")


def is_model_file(name: str) -> bool:
    return bool(_WEIGHTS.match(name)) or name in CONFIG_FILES


def claims_a_model(name: str) -> bool:
    """The files `from_pretrained` starts from: an index, or an unsharded weights file."""
    return bool(_WEIGHTS.match(name)) and (name.endswith(".index.json") or not _SHARD.search(name))


def problem_with(target: str) -> str | None:
    """Why `target` cannot receive an export (checked on global rank 0 before anything is gathered), or None."""
    if os.path.exists(target) and not os.path.isdir(target):
        return f"{target} exists and is not a directory; pass a directory path (it is created if missing)"
    if os.path.isdir(target):
        try:  # the moves at the end need to write in it (access checks are not enough: root, read-only mounts)
            probe = os.path.join(target, f".ep_ds_shim-probe-{secrets.token_hex(4)}")
            open(probe, "x").close()
            os.unlink(probe)
        except OSError as error:
            return f"{target} cannot be written ({type(error).__name__}: {error})"
    return None


class Staging:
    """The temporary sibling of one export (made on global rank 0; the path is shared with the other ranks)."""

    def __init__(self, target: str, token: str | None = None):
        self.target = target
        self.parent, self.name = os.path.split(target)
        self.token = token or secrets.token_hex(6)
        self.path = os.path.join(self.parent, _SIBLING.format(name=self.name) + self.token)
        self.problem: str | None = None  # why the target cannot receive the export (global rank 0 only)

    def create(self) -> None:
        """Make the sibling (and the target's parents), after removing siblings a killed export left behind."""
        os.makedirs(self.parent, exist_ok=True)
        prefix = _SIBLING.format(name=self.name)
        for leftover in sorted(os.listdir(self.parent)):
            if leftover.startswith(prefix):
                logger.info(f"ep_ds_shim.save_pretrained: removing {leftover}, left by an export that did not finish")
                shutil.rmtree(os.path.join(self.parent, leftover), ignore_errors=True)
        os.mkdir(self.path)
        with open(os.path.join(self.path, MARKER), "w") as handle:
            handle.write(self.token)

    def visible_here(self) -> bool:
        """Whether this rank sees the sibling global rank 0 made (a filesystem shared with it)."""
        try:
            with open(os.path.join(self.path, MARKER)) as handle:
                return handle.read() == self.token
        except OSError:
            return False

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Move the verified export into place (see the module docstring for the order)."""
        os.unlink(os.path.join(self.path, MARKER))
        if not os.path.exists(self.target):
            os.rename(self.path, self.target)
            fsync_directory(self.parent)
            return
        new = sorted(os.listdir(self.path))
        old = [name for name in os.listdir(self.target) if is_model_file(name)
               and os.path.isfile(os.path.join(self.target, name))]
        for name in old:  # what makes it load as a model goes first...
            if claims_a_model(name):
                os.unlink(os.path.join(self.target, name))
        fsync_directory(self.target)
        for name in old:  # ... then stale model files the new export does not replace
            if not claims_a_model(name) and name not in new:
                os.unlink(os.path.join(self.target, name))
        for name in sorted(new, key=claims_a_model):  # what makes it load as a model comes last
            os.replace(os.path.join(self.path, name), os.path.join(self.target, name))
        fsync_directory(self.target)
        os.rmdir(self.path)


def fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
