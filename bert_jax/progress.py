"""Progress display: a bar on a terminal, plain lines elsewhere.

A redrawn bar is written out whole at every redraw where stderr is not a terminal (a pod's
log, SLURM's output file, `nohup`): a long run's log would be megabytes of carriage returns.
There `bar` prints a plain line every `every_s` seconds and one at the end instead.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

# How often a plain progress line is written to a log.
LOG_EVERY_S = 30.0


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str,
        disable: bool | None = False, every_s: float = LOG_EVERY_S):
    """tqdm's bar on a terminal, else `Lines` (`disable=None`: nothing, for stages brief
    enough that their heading and summary say all): both count, take a postfix and `reset()`
    (a loop calls it after its first step, so the rate and ETA leave compilation out)."""
    if disable is None:
        disable = not sys.stderr.isatty()
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                    dynamic_ncols=True)
    return Lines(iterable, total=total, desc=desc, unit=unit, every_s=every_s)


def write(line: str, file=None) -> None:
    """A line of the log (stdout, or `file`), printed above a terminal's bar, not through it."""
    tqdm.write(line, file=file)


class Lines:
    """tqdm's interface where only lines may be written: `desc: n/total unit (p%), rate,
    eta, postfix` on stderr every `every_s` seconds and when closed."""

    def __init__(self, iterable=None, *, total, desc, unit, every_s):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.every_s, self.postfix = every_s, ""
        self.reset()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reset(self):
        """Counts from 0 and times from now, as tqdm's `reset`."""
        self.n, self.start = 0, time.perf_counter()
        self.last, self.closed = self.start, False

    def update(self, n: int = 1):
        self.n += n
        if time.perf_counter() - self.last >= self.every_s:
            self._print()

    def set_postfix(self, values: dict, refresh: bool = True):
        del refresh
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self):
        if not self.closed:
            self.closed = True
            self._print()

    def _print(self):
        now = time.perf_counter()
        self.last = now
        rate = self.n / max(now - self.start, 1e-9)
        parts = [f"{self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if self.n:
            parts.append(f"{rate:.2f} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {', '.join(parts)}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
