"""Helpers the first-party processors share."""

from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional

from edgepipe.stage import Stage, StageConfig

__all__ = ["check_class_names", "detector_names", "only_changed"]


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
