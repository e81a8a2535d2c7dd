"""Placeholder: `save_pretrained` (filled in by the export work)."""

from __future__ import annotations


def save_pretrained(engine_or_model, save_directory, **save_pretrained_kwargs):
    raise NotImplementedError
