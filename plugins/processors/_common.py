"""Helpers the first-party processors share."""

from __future__ import annotations

from typing import Iterable, List, Tuple, Union

from edgepipe.stage import StageConfig

__all__ = ["only_changed", "parse_imgsz"]


def parse_imgsz(value: Union[int, List[int]], stride: int = 32) -> Tuple[int, int]:
    """``imgsz`` as (h, w): an int is square; [h, w] as given. ValueError if not a stride multiple.
    Shared by the letterbox and yolov5 stages (a plugin never imports a sibling plugin)."""
    h, w = (value, value) if isinstance(value, int) else (value[0], value[1])
    if h % stride or w % stride:
        raise ValueError(f"imgsz {value} must be a multiple of the stride {stride}")
    return h, w


def only_changed(old: StageConfig, new: StageConfig, fields: Iterable[str]) -> bool:
    """True when ``new`` differs from ``old`` in nothing but ``fields`` (same type, same links)."""
    if type(old) is not type(new):
        return False
    allowed = set(fields)
    a, b = old.model_dump(), new.model_dump()
    return all(a[k] == b[k] for k in a if k not in allowed)
