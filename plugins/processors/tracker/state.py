"""What a tracker keeps in the daemon's runtime directory so that a restarted worker never reuses
a track id and can end the tracks that were open.

The sources keep their next frame id there (:class:`edgepipe.runtime.PositionFile`); the tracker
does the same for its next track id per source, plus a summary of every confirmed track still
open (label, first and last seen, best confidence, last box, snapshot): ``<stage>.state.json``
(:data:`edgepipe.runtime.STATE_SUFFIX`: the daemon removes it when it stops, and a stale one when
it starts).
The file is rewritten (to a temporary name, then renamed over, so a kill never leaves half of
it) before a frame carrying a new id leaves the stage, when a track ends, and otherwise at most
once a second, so ``last_seen`` and ``bbox`` of a track ended by a restart can be up to a
second old.

The file is tied to one run of the daemon (:func:`daemon_run`: the supervisor's pid and start
time): a file left by an earlier daemon in a configured ``runtime.dir`` is ignored, and ids then
start again at 1, with event ids kept apart by the new run.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from edgepipe.runtime import STATE_SUFFIX as SUFFIX

__all__ = ["SUFFIX", "TrackerState", "daemon_run"]


def daemon_run() -> str:
    """8 hex digits naming this run of the daemon: the same in every worker of it and in every
    incarnation of a worker, different for the next daemon (its supervisor, this process's
    parent, has another pid or start time)."""
    ppid = os.getppid()
    start = "0"
    try:
        with open(f"/proc/{ppid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        start = stat[stat.rfind(")") + 2:].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        pass
    return hashlib.sha1(f"{ppid}:{start}".encode()).hexdigest()[:8]


class TrackerState:
    """Next ids and open tracks per source, persisted at ``path`` (None: kept in memory only, a
    stage outside a daemon)."""

    def __init__(self, path: Optional[str], run: str) -> None:
        self.path = path
        self.run = run
        self.next_id: Dict[str, int] = {}

    def load(self) -> Tuple[Dict[str, int], Dict[str, List[Dict[str, Any]]]]:
        """(next id per source, open track summaries per source) left by an earlier incarnation
        of this stage in this run of the daemon; empty when there is none. A damaged file
        raises ValueError (one line)."""
        if self.path is None or not os.path.exists(self.path):
            return {}, {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tracker state {self.path!r} is unreadable: {exc}") from None
        if not isinstance(data, dict) or data.get("run") != self.run:
            return {}, {}  # an earlier daemon's
        next_id = {str(k): int(v) for k, v in dict(data.get("next_id") or {}).items()}
        open_tracks = {str(k): list(v) for k, v in dict(data.get("open") or {}).items()}
        self.next_id = dict(next_id)
        return next_id, open_tracks

    def allocate(self, source: str) -> int:
        """The next id of ``source`` (1, 2, ...); call :meth:`save` before it is published."""
        value = self.next_id.get(source, 1)
        self.next_id[source] = value + 1
        return value

    def save(self, open_tracks: Dict[str, List[Dict[str, Any]]]) -> None:
        """Write next ids and ``open_tracks`` atomically; OSError when the directory fails."""
        if self.path is None:
            return
        data = {"run": self.run, "next_id": self.next_id, "open": open_tracks}
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, self.path)
