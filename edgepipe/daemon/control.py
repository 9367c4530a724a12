"""The control channel between the supervisor and its workers: the message kinds and their framing,
imported by both sides so neither can speak a dialect of its own.

The supervisor binds a ROUTER on ``ipc://<runtime dir>/control``; each worker connects a DEALER
whose identity is ``<worker>:<incarnation>``, so the supervisor can tell a restarted worker's
messages from the last words of the process it replaced. A message is two frames, the kind and a
msgpack map (the ROUTER adds the identity in front on the supervisor's side).
"""

from __future__ import annotations

import enum
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack

__all__ = ["Control", "ControlError", "identity", "pack", "parse_identity", "unpack"]


class Control(str, enum.Enum):
    """What a control message says. Supervisor to worker: RUN (sources may read), STOP (drain
    and end), EXIT (your consumers have your end markers: you may exit), ENDED (these upstream
    stages have finished; ``stages``), RECONFIGURE (new settings, ``stages``: name -> settings).
    Worker to supervisor: READY (``pid``, ``series``: what each stage declared, ``addresses``:
    where each stage can be reached), HEARTBEAT (``stages``: metrics and state), FAILED
    (``reason``), FINISHED (every stage ended), RECONFIGURED (``stages``: name -> applied)."""

    RUN = "RUN"
    STOP = "STOP"
    EXIT = "EXIT"
    ENDED = "ENDED"
    RECONFIGURE = "RECONFIGURE"
    READY = "READY"
    HEARTBEAT = "HEARTBEAT"
    FAILED = "FAILED"
    FINISHED = "FINISHED"
    RECONFIGURED = "RECONFIGURED"


class ControlError(ValueError):
    """A control message that cannot be read; the text says what is wrong with it."""


def pack(kind: Control, body: Optional[Dict[str, Any]] = None) -> List[bytes]:
    return [kind.value.encode(), msgpack.packb(body or {}, use_bin_type=True)]


def unpack(parts: Sequence[Any]) -> Tuple[Control, Dict[str, Any]]:
    """``[kind, body]`` frames -> (Control, body); ControlError when malformed."""
    if not 1 <= len(parts) <= 2:
        raise ControlError(f"{len(parts)} frames, expected 2")
    raw = bytes(parts[0]).decode(errors="replace")
    try:
        kind = Control(raw)
    except ValueError:
        raise ControlError(f"unknown control message {raw[:40]!r}") from None
    try:
        body = msgpack.unpackb(bytes(parts[1]), raw=False) if len(parts) > 1 else {}
    except Exception:  # msgpack raises many types on garbage
        raise ControlError(f"{kind.value}: body is not msgpack") from None
    if not isinstance(body, dict):
        raise ControlError(f"{kind.value}: body is a {type(body).__name__}, not a map")
    return kind, body


def identity(worker: str, incarnation: int) -> bytes:
    return f"{worker}:{incarnation}".encode()


def parse_identity(raw: bytes) -> Tuple[str, int]:
    """(worker, incarnation) from a DEALER identity; ControlError when it is not one of ours."""
    name, _, inc = bytes(raw).decode(errors="replace").rpartition(":")
    if not name or not inc.isdigit():
        raise ControlError(f"identity {raw[:60]!r} is not worker:incarnation")
    return name, int(inc)
