"""Helpers the first-party processors share: the ``imgsz`` setting and in-place reconfiguration."""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from pydantic import BeforeValidator
from typing_extensions import Annotated

from edgepipe.stage import Stage, StageConfig

__all__ = [
    "IMGSZ_MAX",
    "IMGSZ_MIN",
    "ImageSize",
    "check_class_names",
    "detector_names",
    "only_changed",
    "parse_imgsz",
]

IMGSZ_MIN = 32  # one cell of the coarsest (stride 32) detection level
IMGSZ_MAX = 8192


def _side(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):  # from ${VAR} interpolation
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("imgsz is an int or [height, width] of ints")
    if not IMGSZ_MIN <= value <= IMGSZ_MAX:
        raise ValueError(f"imgsz sides must be between {IMGSZ_MIN} and {IMGSZ_MAX}")
    return value


def _imgsz(value: Any) -> Union[int, List[int]]:
    """An int (square) or [height, width], each side an int in range; anything else is one
    ValueError (a single message, so the config error is one line)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError("imgsz is an int or [height, width] of ints")
        return [_side(v) for v in value]
    return _side(value)


ImageSize = Annotated[Union[int, List[int]], BeforeValidator(_imgsz)]
"""The detector's input size setting: an int (square) or [height, width], sides 32-8192."""


def parse_imgsz(value: Union[int, List[int]], stride: int = 32) -> Tuple[int, int]:
    """``imgsz`` as (h, w): an int is square; [h, w] as given. ValueError if not a stride multiple."""
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


def detector_names(upstream: Dict[str, Stage]) -> Optional[List[str]]:
    """The class names of the detector upstream, when they can be known without loading it: its
    ``weights`` is ``builtin:<name>`` or an edgepipe safetensors file (the names are in the
    file's metadata, read with safetensors' numpy reader, no torch). None otherwise (a ``.pt``
    checkpoint, an untrained model, no detector): callers then check names on the first frame.
    The nearest stage with a ``weights`` setting counts."""
    for stage in reversed(list(upstream.values())):
        weights = getattr(stage.config, "weights", None)
        if not isinstance(weights, str):
            continue
        try:
            from safetensors import safe_open

            from edgepipe.yolo.builtin import resolve_weights

            path = resolve_weights(weights)
            if not path.endswith(".safetensors"):
                return None
            with safe_open(path, framework="np") as f:  # type: ignore[no-untyped-call]
                names = json.loads((f.metadata() or {}).get("names", "null"))
        except Exception:  # unreadable here: the detector's own checks report it
            return None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
        return None
    return None


def check_class_names(wanted: Optional[Iterable[str]], upstream: Dict[str, Stage], field: str) -> None:
    """ValueError (one line naming ``field``) when a class name in ``wanted`` is not one of the
    upstream detector's classes (known statically, see :func:`detector_names`)."""
    if not wanted:
        return
    names = detector_names(upstream)
    if names is None:
        return
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(
            f"{field}: unknown class {unknown[0]!r}; the detector's classes are {', '.join(names)}"
        )
