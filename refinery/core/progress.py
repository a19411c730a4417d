"""Show progress of long work: a tqdm bar on a terminal, a plain line every few seconds in a log."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class LineProgress:
    """A progress report for logs and pipes (``make repro 2>&1 | cat``, CI): one line every ``every_s``.

    Each line reads ``<desc>: <done>/<total> <unit>s (<pct>%), <rate>/s, elapsed m:ss, ETA m:ss``; a last
    line is written on close. It offers the part of tqdm's interface refinery uses (update, set_postfix,
    write, close).
    """

    def __init__(self, total: int, desc: str, unit: str, *, every_s: float, file: TextIO):
        self.total, self.desc, self.unit, self.every_s, self.file = total, desc, unit, every_s, file
        self.n, self.postfix, self.printed = 0, "", -1
        self.start = self.last = time.monotonic()
        self.closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {_clock((self.total - self.n) / rate)}" if rate > 0 and self.total and self.n < self.total else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {rate:.2f}/s, elapsed {_clock(elapsed)}"
                f"{eta}{self.postfix}")

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done; print a line when ``every_s`` passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last, self.printed = now, self.n
            print(self._line(), file=self.file, flush=True)

    def set_postfix(self, **values: Any) -> None:
        """Append ``key=value`` pairs to the next lines (e.g. the current loss)."""
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print a message line."""
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        """Print the final line once (unless the last line already said it)."""
        if not self.closed and self.n and self.n != self.printed:
            print(self._line(), file=self.file, flush=True)
        self.closed = True


def progress(total: int, desc: str, unit: str, *, enabled: bool = True, file: TextIO | None = None) -> Any:
    """Return a tqdm bar when ``file`` (stderr) is a terminal, else a :class:`LineProgress`; nothing when disabled.

    ``REFINERY_PROGRESS_S`` sets the seconds between log lines (default 10).
    """
    from tqdm import tqdm

    file = file or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True, mininterval=1.0)
    return LineProgress(total, desc, unit, every_s=float(os.environ.get("REFINERY_PROGRESS_S", "10")), file=file)
