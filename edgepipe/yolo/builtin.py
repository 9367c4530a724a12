"""Models that ship inside the package, named in configs as ``weights: builtin:<name>``.

A config must not depend on where edgepipe is installed (a venv, site-packages, a wheel on a
Jetson), so the packaged weights are referred to by name and found through
:mod:`importlib.resources`. ``builtin:demo`` is the demo model: a YOLOv5n with one input channel
trained on the generated shapes of :mod:`edgepipe.scenes` (``circle``, ``square``, ``triangle``,
``cross``; see docs/training.md). This module imports no torch: ``edgepipe validate`` checks a
``builtin:`` name without loading a model.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Dict

from pydantic import AfterValidator
from typing_extensions import Annotated

__all__ = ["BUILTIN", "PREFIX", "WeightsRef", "builtin_path", "check_weights_ref", "resolve_weights"]

PREFIX = "builtin:"
BUILTIN: Dict[str, str] = {
    "demo": "demo-yolov5n.safetensors",
}
"""Built-in model name -> file name under ``edgepipe/data``."""


def _data_dir() -> Path:
    """edgepipe's package data folder. The weights are opened by path (safetensors maps the
    file), so the package must be on disk, as every pip install of edgepipe is."""
    if hasattr(importlib.resources, "files"):  # Python 3.9+
        return Path(str(importlib.resources.files("edgepipe") / "data"))  # novermin (guarded)
    import edgepipe  # Python 3.8: no importlib.resources.files

    return Path(edgepipe.__file__).resolve().parent / "data"


def builtin_path(name: str) -> Path:
    """The file of built-in model ``name`` (``demo``); ValueError (one line) when the name is
    unknown or the file is missing from the installation."""
    filename = BUILTIN.get(name)
    if filename is None:
        raise ValueError(f"unknown built-in model {name!r}; built in: {', '.join(PREFIX + n for n in BUILTIN)}")
    path = _data_dir() / filename
    if not path.is_file():
        raise ValueError(f"built-in model {name!r} is missing from the installation (expected {str(path)!r})")
    return path


def resolve_weights(value: str) -> str:
    """A weights reference as a file path: ``builtin:<name>`` becomes the packaged file,
    anything else is returned unchanged (a path, relative to the working directory)."""
    if value.startswith(PREFIX):
        return str(builtin_path(value[len(PREFIX):]))
    return value


def check_weights_ref(value: str) -> str:
    """Validator for a config's ``weights``: a ``builtin:`` name that is installed, or an
    existing file. Returns the value as written (resolved when the model is loaded)."""
    if value.startswith(PREFIX):
        builtin_path(value[len(PREFIX):])
    elif not os.path.isfile(os.path.expanduser(value)):
        raise ValueError("no such file")
    return value


WeightsRef = Annotated[str, AfterValidator(check_weights_ref)]
"""A config field naming model weights: a file that must exist or ``builtin:<name>``."""
