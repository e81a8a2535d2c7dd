"""Placeholder: EP-aware save and checkpoint paths of a DeepSpeed engine (filled in by the export work)."""

from __future__ import annotations


def attach(engine, record) -> None:
    return None
