"""Log lines for recurring failures: one line per cause per interval, the repeats only counted.

Bad input can arrive thousands of times a second (a producer sending float images, a peer
sending garbage); every occurrence is counted in the metrics, and the journal gets one line per
distinct cause every ``interval`` seconds, saying how many were suppressed since. Two failures
have the same cause when their messages differ only in numbers (frame ids, sizes).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Dict, Tuple

__all__ = ["CauseLog"]

_NUMBERS = re.compile(r"\d+(\.\d+)?")


class CauseLog:
    """``log(level, text)`` writes ``text`` unless the same cause was logged less than
    ``interval`` seconds ago; the next line of that cause says how many were left out. At most
    ``max_causes`` causes are remembered (the oldest is forgotten). Thread-safe."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_causes: int = 64) -> None:
        self.logger = logger
        self.interval = interval
        self.max_causes = max_causes
        self._seen: Dict[str, Tuple[float, int]] = {}  # cause -> (last logged, suppressed since)
        self._lock = threading.Lock()

    def log(self, level: int, text: str) -> bool:
        """True when the line was written."""
        cause = _NUMBERS.sub("#", text)[:160]
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(cause, (-1e18, 0))
            if now - last < self.interval:
                self._seen[cause] = (last, suppressed + 1)
                return False
            self._seen.pop(cause, None)
            self._seen[cause] = (now, 0)
            while len(self._seen) > self.max_causes:
                self._seen.pop(next(iter(self._seen)))
        more = f" ({suppressed} more like it in the last {self.interval:.0f} s were only counted)" if suppressed else ""
        self.logger.log(level, "%s%s", text, more)
        return True
