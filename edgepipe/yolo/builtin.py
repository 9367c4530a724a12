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
import stat
from pathlib import Path
from typing import Dict, List, Optional

from pydantic import AfterValidator
from typing_extensions import Annotated

__all__ = [
    "BUILTIN",
    "PREFIX",
    "WeightsRef",
    "builtin_path",
    "check_weights_readable",
    "check_weights_ref",
    "resolve_weights",
]

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
    existing file this user (and the systemd service's user) can read. Returns the value as
    written (resolved when the model is loaded)."""
    if value.startswith(PREFIX):
        builtin_path(value[len(PREFIX):])
    elif not os.path.isfile(os.path.expanduser(value)):
        raise ValueError("no such file")
    check_weights_readable(value)
    return value


# The systemd units deploy/systemd/ ships, and where systemd looks for installed units
# ($SYSTEMD_UNIT_PATH, colon-separated, replaces the list as it does for systemd itself).
UNIT_NAMES = ("edgepipe.service", "edgepipe@.service")
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
SERVICE_GROUP = "video"  # the units' SupplementaryGroups=
_DYNAMIC_UIDS = range(61184, 65520)  # where systemd allocates DynamicUser= users


def dynamic_user_units() -> List[str]:
    """Installed edgepipe units that run as a transient user (``DynamicUser=yes``)."""
    env = os.environ.get("SYSTEMD_UNIT_PATH")
    dirs = [d for d in env.split(":") if d] if env else list(UNIT_DIRS)
    found = []
    for folder in dirs:
        for name in UNIT_NAMES:
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    lines = [ln.split("=", 1) for ln in f.read().splitlines() if ln.strip().startswith("DynamicUser")]
            except OSError:
                continue
            if any(len(kv) == 2 and kv[1].strip().lower() in ("yes", "true", "on", "1") for kv in lines):
                found.append(path)
    return found


def _group_id(name: str) -> Optional[int]:
    try:
        import grp

        return grp.getgrnam(name).gr_gid
    except (ImportError, KeyError):
        return None


def _closed_to_others(path: str) -> Optional[str]:
    """What keeps a user who is neither the owner nor (except the service group) in the group
    from reading ``path`` (no r on the file, no x on a folder above it), or None."""
    video = _group_id(SERVICE_GROUP)
    st = os.stat(path)
    if not (st.st_mode & stat.S_IROTH or (st.st_gid == video and st.st_mode & stat.S_IRGRP)):
        return f"is not world-readable (mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)})"
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        st = os.stat(folder)
        if not (st.st_mode & stat.S_IXOTH or (st.st_gid == video and st.st_mode & stat.S_IXGRP)):
            return f"is in folder {folder!r}, which others cannot enter (mode {stat.S_IMODE(st.st_mode):04o})"
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_weights_readable(value: str) -> str:
    """ValueError (one line) when the weights ``value`` names cannot be read by this user, or
    cannot be read by the user an installed systemd unit runs edgepipe as (``DynamicUser=yes``:
    a transient user who reads only what others may read, see deploy/systemd/)."""
    path = os.path.expanduser(resolve_weights(value))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot open {path!r}: {exc.strerror}") from None
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)}"
    uid = os.geteuid() if hasattr(os, "geteuid") else -1
    if not os.access(path, os.R_OK):
        who = f"{_owner(uid)}" if uid >= 0 else "this user"
        hint = ""
        if os.environ.get("INVOCATION_ID") and uid in _DYNAMIC_UIDS:
            hint = ("; edgepipe runs as the systemd service's dynamic user (DynamicUser=yes), which reads only "
                    f"world-readable files: chmod o+r {path}")
        raise ValueError(f"{path!r} is not readable by this user ({who}; {mode}){hint}")
    units = dynamic_user_units()
    closed = _closed_to_others(path) if units else None
    if closed:
        raise ValueError(
            f"{path!r} {closed}: the systemd service ({units[0]}, DynamicUser=yes) runs as a transient "
            f"user and will not be able to read it; chmod o+r {path} (and o+x on its folders)"
        )
    return value


WeightsRef = Annotated[str, AfterValidator(check_weights_ref)]
"""A config field naming model weights: a file that must exist or ``builtin:<name>``."""
