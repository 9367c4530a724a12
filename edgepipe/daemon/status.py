"""What the daemon says about itself while it runs: the status line (a log line every
``runtime.status_interval`` s when stderr is not a terminal, the systemd STATUS= text), the live
table on a terminal, and the summary when a finite pipeline is done.

Rates are per stage since the previous output of the same kind (each keeps its own interval):
frames per second, mean processing time per call, drops, and the totals of frames and of the
detections that reached each sink. A finite source that knows its length (a file, a folder of
images, a counted synthetic scene) gets a progress column and an estimate of the time left.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

from edgepipe.metrics import StageMetrics

__all__ = ["Rate", "Rates", "StatusBoard", "StatusOutput", "board_lines", "duration", "status_line", "summary"]


@dataclass
class Rate:
    kind: str
    fps: float
    latency: float  # mean seconds per call
    drops: float
    frames: float
    detections: float


def _counts(m: StageMetrics) -> Tuple[float, float, float, float]:
    frames = m.frames_read.value if m.kind == "source" else m.received.value
    drops = sum(c.value for c in m.dropped.children.values())
    h = m.processing_seconds
    return frames, drops, h.sum, float(h.count)


class Rates:
    """Per-stage rates since the previous :meth:`update` with the same ``key``."""

    def __init__(self) -> None:
        self._prev: Dict[str, Tuple[float, Dict[str, Tuple[float, float, float, float]]]] = {}

    def update(self, key: str, totals: Dict[str, StageMetrics]) -> Dict[str, Rate]:
        now = time.monotonic()
        prev_t, prev = self._prev.get(key, (0.0, {}))
        dt = now - prev_t if prev_t else 0.0
        out: Dict[str, Rate] = {}
        cur = {}
        for name, m in totals.items():
            c = cur[name] = _counts(m)
            f0, d0, s0, n0 = prev.get(name, (0.0, 0.0, 0.0, 0.0))
            out[name] = Rate(
                kind=m.kind,
                fps=(c[0] - f0) / dt if dt > 0 else 0.0,
                latency=(c[2] - s0) / (c[3] - n0) if c[3] > n0 else 0.0,
                drops=c[1] - d0,
                frames=c[0],
                detections=m.detections_seen.value,
            )
        self._prev[key] = (now, cur)
        return out


def status_line(rates: Dict[str, Rate]) -> str:
    parts = []
    for name, r in rates.items():
        text = f"{name} {r.fps:.1f} fps"
        if r.latency:
            text += f" {r.latency * 1000:.1f} ms"
        if r.drops:
            text += f" {r.drops:.0f} dropped"
        if r.kind == "sink":
            text += f" {r.detections:.0f} detections"
        parts.append(text)
    return "; ".join(parts)


def summary(totals: Dict[str, StageMetrics], elapsed: float) -> str:
    elapsed = max(1e-6, elapsed)
    parts = []
    for name, m in totals.items():
        frames = _counts(m)[0]
        text = f"{name} {frames:.0f} frames ({frames / elapsed:.1f} fps)"
        if m.kind == "sink":
            text += f", {m.detections_seen.value:.0f} detections"
        parts.append(text)
    return f"Finished in {elapsed:.1f} s: " + "; ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


def board_lines(
    title: str,
    rates: Dict[str, Rate],
    states: Dict[str, str],
    expected: Dict[str, int],
) -> List[str]:
    """The live table: a title line, a header, one row per stage; a finite source with a
    known length shows how far it is and the time left at its current rate."""
    lines = [title, f"  {'stage':<16} {'kind':<9} {'state':<7} {'fps':>7} {'ms/call':>8} {'dropped':>8} {'detections':>10}  progress"]
    for name, r in rates.items():
        progress = ""
        total = expected.get(name)
        if total:
            done = min(r.frames, total)
            progress = f"{done:.0f}/{total} ({100.0 * done / total:.0f}%)"
            if r.fps > 0 and done < total:
                progress += f", {duration((total - done) / r.fps)} left"
        detections = f"{r.detections:10.0f}" if r.kind == "sink" else f"{'':>10}"
        lines.append(
            f"  {name:<16} {r.kind:<9} {states.get(name, '?'):<7} {r.fps:7.1f} {r.latency * 1000:8.1f} "
            f"{r.drops:8.0f} {detections}  {progress}".rstrip()
        )
    return lines


class StatusBoard:
    """A few lines redrawn in place on a terminal; log records print above them. :meth:`close`
    erases the table, so what follows (the summary) is not followed by stale numbers."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lines: List[str] = []
        self.closed = False
        self.handler = _BoardLogHandler(self)
        root = logging.getLogger()
        self.previous = list(root.handlers)
        if self.previous:
            self.handler.setFormatter(self.previous[0].formatter)
            self.handler.setLevel(self.previous[0].level)
        for h in self.previous:
            root.removeHandler(h)
        root.addHandler(self.handler)

    def clear(self) -> None:
        if self.lines:
            self.stream.write(f"\x1b[{len(self.lines)}F\x1b[J")

    def draw(self, lines: List[str]) -> None:
        if self.closed:
            return
        self.clear()
        self.lines = lines
        self.stream.write("".join(line + "\x1b[K\n" for line in lines))
        self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.clear()
        self.lines = []
        self.stream.flush()
        root = logging.getLogger()
        root.removeHandler(self.handler)
        for h in self.previous:
            root.addHandler(h)


class _BoardLogHandler(logging.Handler):
    def __init__(self, board: StatusBoard) -> None:
        super().__init__()
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            self.board.clear()
            self.board.stream.write(msg + "\n")
            self.board.stream.write("".join(line + "\x1b[K\n" for line in self.board.lines))
            self.board.stream.flush()
        except Exception:
            self.handleError(record)




class StatusOutput:
    """The status outputs, each on its own clock: the live table on a terminal (every second),
    else a log line every ``interval`` s, and systemd's STATUS= (every 5 s, naming unhealthy
    stages first). :meth:`close` erases the table for good (before the summary line)."""

    TTY_REFRESH_S = 1.0
    SYSTEMD_INTERVAL_S = 5.0

    def __init__(self, stream: IO[str], interval: float, notifier: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval
        self.notifier = notifier
        self.rates = Rates()
        self.board: Optional[StatusBoard] = None
        self.next_line = self.next_systemd = 0.0

    def start(self, totals: Dict[str, StageMetrics]) -> None:
        for key in ("log", "systemd", "board"):
            self.rates.update(key, totals)  # start the intervals
        if self.tty:
            self.board = StatusBoard(self.stream)
        self.next_line = time.monotonic() + (self.TTY_REFRESH_S if self.tty else self.interval)

    def tick(
        self,
        title: str,
        totals: Dict[str, StageMetrics],
        states: Callable[[], Dict[str, str]],
        expected: Dict[str, int],
        unhealthy: Callable[[], List[str]],
    ) -> None:
        now = time.monotonic()
        if self.board is not None and now >= self.next_line:
            self.next_line = now + self.TTY_REFRESH_S
            self.board.draw(board_lines(title, self.rates.update("board", totals), states(), expected))
        elif not self.tty and now >= self.next_line:
            self.next_line = now + self.interval
            logging.getLogger("edgepipe.supervisor").info("Status: %s", status_line(self.rates.update("log", totals)))
        if self.notifier.enabled and now >= self.next_systemd:
            self.next_systemd = now + self.SYSTEMD_INTERVAL_S
            problems = unhealthy()
            prefix = f"Unhealthy: {'; '.join(problems)} | " if problems else ""
            self.notifier.status(prefix + status_line(self.rates.update("systemd", totals)))

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
