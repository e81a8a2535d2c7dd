"""The exit mark (`distributed._mark_exit`) goes to the store of the process group in use, not the first one seen."""

from __future__ import annotations

import atexit

import pytest
import torch.distributed as dist

from ep_ds_shim import distributed


@pytest.fixture
def fresh_exit_mark(monkeypatch):
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(distributed, "_exit_marked", [])
    yield registered


def _one_rank_group():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    return dist.distributed_c10d._get_default_store()


def test_the_exit_mark_follows_a_recreated_process_group(fresh_exit_mark):
    first = _one_rank_group()
    try:
        distributed.exchange("test/exit-mark", {})
    finally:
        dist.destroy_process_group()
    second = _one_rank_group()
    try:
        distributed.exchange("test/exit-mark", {})
        assert fresh_exit_mark == [distributed._mark_exit]  # registered once, however many groups
        distributed._mark_exit()  # what the interpreter's exit runs
        assert second.check([f"{distributed._EXITED}0"])  # the group in use is told
        assert not first.check([f"{distributed._EXITED}0"])  # not the destroyed one
    finally:
        dist.destroy_process_group()
