"""What a tracker keeps in the daemon's runtime directory so that a restarted worker never reuses
a track id and can end the tracks that were open.

The sources keep their next frame id there (:class:`edgepipe.runtime.PositionFile`); the tracker
does the same for its next track id per source, plus a summary of every confirmed track still
open (label, first and last seen, best confidence, last box, snapshot): ``<stage>.state.json``
(:data:`edgepipe.runtime.STATE_SUFFIX`: the daemon removes it when it stops, and a stale one when
it starts).
The file is rewritten (to a temporary name, then renamed over, so a kill never leaves half of
it) once a second of each source's time (or once the journal has 1000 lines), so ``last_seen`` and ``bbox`` of a track ended by a
restart can be up to a second old. What happens in between is appended to a journal beside it,
``<stage>.journal.state.json``, one JSON line per change, before a frame carrying the change
leaves the stage: a track confirmed (``new``, its summary, whose id is the last one given:
ids are given on confirmation), tracks ended (``end``, their ids). Loading replays the journal
over the file, so a restart knows every id published and every track still open; rewriting the
file empties the journal. Appending a
line costs a small fraction of rewriting the summaries of 50 open tracks, which the stage used to
do on every frame with a new or an ended track. A line cut short by a kill is one whose frame
never left, and is ignored. Replaying is idempotent: a journal left by a kill between a rewrite
and the emptying only repeats what the file already says.

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

__all__ = ["JOURNAL_SUFFIX", "SUFFIX", "TrackerState", "daemon_run"]

JOURNAL_SUFFIX = ".journal" + SUFFIX  # ends in SUFFIX: the daemon removes it with the file


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
        self.journal_path = None if path is None else path[:-len(SUFFIX)] + JOURNAL_SUFFIX
        self.run = run
        self.next_id: Dict[str, int] = {}
        self._journal: Optional[int] = None  # file descriptor, opened for appending by save()
        self.journaled = 0  # lines in the journal

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
        self._replay(next_id, open_tracks)
        self.next_id = dict(next_id)
        return next_id, open_tracks

    def _replay(self, next_id: Dict[str, int], open_tracks: Dict[str, List[Dict[str, Any]]]) -> None:
        """Apply the journal's changes, in order, to what the file said."""
        assert self.journal_path is not None
        try:
            with open(self.journal_path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ValueError(f"tracker state journal {self.journal_path!r} is unreadable: {exc}") from None
        for line in lines:
            try:
                change = json.loads(line)
            except ValueError:
                continue  # the empty tail, or a line a kill cut short: its frame never left
            if not isinstance(change, dict):
                continue
            for source, summary in dict(change.get("new") or {}).items():
                next_id[str(source)] = max(next_id.get(str(source), 1), int(summary["track_id"]) + 1)
                rows = [r for r in open_tracks.get(str(source), []) if r.get("track_id") != summary.get("track_id")]
                open_tracks[str(source)] = rows + [summary]
            for source, ended in dict(change.get("end") or {}).items():
                gone = set(ended)
                open_tracks[str(source)] = [r for r in open_tracks.get(str(source), [])
                                            if r.get("track_id") not in gone]

    def allocate(self, source: str) -> int:
        """The next id of ``source`` (1, 2, ...); call :meth:`save` before it is published."""
        value = self.next_id.get(source, 1)
        self.next_id[source] = value + 1
        return value

    def save(self, open_tracks: Dict[str, List[Dict[str, Any]]]) -> None:
        """Write next ids and ``open_tracks`` atomically, then empty the journal; OSError when
        the directory fails."""
        if self.path is None or self.journal_path is None:
            return
        data = {"run": self.run, "next_id": self.next_id, "open": open_tracks}
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, separators=(",", ":")))  # one write: json.dump writes in pieces
        os.replace(tmp, self.path)
        if self._journal is None:
            self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.ftruncate(self._journal, 0)
        self.journaled = 0

    def append(self, changes: List[Dict[str, Any]]) -> None:
        """Journal ``changes`` (``{"new": {source: summary}}``, ``{"end": {source: [track ids]}}``) after the last :meth:`save`; OSError when the
        directory fails."""
        if self._journal is None or not changes:
            return
        data = "".join(json.dumps(c, separators=(",", ":")) + "\n" for c in changes).encode("utf-8")
        while data:
            data = data[os.write(self._journal, data):]
        self.journaled += len(changes)

    def close(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
