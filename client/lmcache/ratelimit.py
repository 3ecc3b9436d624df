"""Log lines that cannot flood an engine's log.

A kvpack outage turns every lookup into a failure; one line per failure would write thousands
of lines a second. :class:`RateLimitedLog` writes the first failure of each kind at once, then at
most one line per ``interval`` seconds for that kind, saying how many were left out in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """``warning(kind, msg, *args)``: at most one line per ``interval`` seconds per ``kind``."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(
        self, kind: str, msg: str, *args: object, exc_info: BaseException | None = None
    ) -> bool:
        """Log ``msg % args`` as a warning (with ``exc_info``'s traceback if given) unless
        ``kind`` was logged less than ``interval`` seconds ago; True if a line was written."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                return False
            self._last[kind] = now
            skipped = self._skipped.pop(kind, 0)
        if skipped:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, skipped, self.interval)
        self.logger.warning(msg, *args, exc_info=exc_info)
        return True
