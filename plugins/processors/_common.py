"""Helpers the first-party processors share."""

from __future__ import annotations

from typing import Iterable

from edgepipe.stage import StageConfig

__all__ = ["only_changed"]


def only_changed(old: StageConfig, new: StageConfig, fields: Iterable[str]) -> bool:
    """True when ``new`` differs from ``old`` in nothing but ``fields`` (same type, same links)."""
    if type(old) is not type(new):
        return False
    allowed = set(fields)
    a, b = old.model_dump(), new.model_dump()
    return all(a[k] == b[k] for k in a if k not in allowed)
