"""Progress for long work (catch-up, recovery, dump, verify): only on a terminal.

Writes one self-overwriting line to stderr when stderr is a terminal, with the
rate and, when the total is known, the time left. In scripts and logs (stderr
not a terminal) it prints nothing at all.
"""

from __future__ import annotations

import sys
import time

REFRESH_S = 0.2


class Progress:
    def __init__(self, what: str, total: int | None, *, stream=None, start: int = 0):
        self.what = what
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.start_value = start
        self.started = time.monotonic()
        self.shown_at = 0.0
        self.shown = False

    def update(self, value: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.shown_at < REFRESH_S:
            return
        self.shown_at = now
        done = value - self.start_value
        rate = done / max(now - self.started, 1e-6)
        text = f"{self.what}: {value:,}"
        if self.total:
            left = (self.total - value) / rate if rate > 0 else float("inf")
            percent = 100.0 * done / max(1, self.total - self.start_value)
            text += f" of {self.total:,} ({percent:.0f}%), {rate:,.0f}/s, {_eta(left)} left"
        else:
            text += f", {rate:,.0f}/s"
        self.stream.write("\r" + text.ljust(78))
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m{seconds % 60:02.0f}s"
