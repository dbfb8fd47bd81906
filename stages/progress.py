"""Progress of a long stage: tqdm's bar on a terminal; when stderr goes to a log (not a terminal), one line every few
seconds instead (``[Generate nest] 12/40 examples, 0.35/s, ETA 1m20s``), so a log shows that a stage that runs for
minutes is alive and when it should end. Changes no output of a stage."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
LOG_EVERY_S = 5.0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    """One log line: done/total, the rate so far and the ETA at that rate.

    >>> progress_line("Generate nest", 12, 40, 34.3, "examples")
    '[Generate nest] 12/40 examples, 0.35/s, ETA 1m20s'
    """
    rate = done / elapsed if elapsed > 0 else 0.0
    head = f"[{desc}] {done}/{total} {unit}" if total is not None else f"[{desc}] {done} {unit}"
    eta = f", ETA {_duration((total - done) / rate)}" if total is not None and rate > 0 and done < total else ""
    return f"{head}, {rate:.2f}/s{eta}" + (f", done in {_duration(elapsed)}" if total is not None and done >= total
                                           else "")


class LogProgress:
    """Counts work done (:meth:`update`) and writes :func:`progress_line` to ``stream`` at most every ``every``
    seconds, and once at the end (:meth:`close`)."""

    def __init__(self, desc: str, total: int | None, unit: str = "items", every: float = LOG_EVERY_S,
                 stream: TextIO | None = None, clock=time.monotonic):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = self.last = clock()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._write(now)

    def _write(self, now: float) -> None:
        print(progress_line(self.desc, self.done, self.total, now - self.t0, self.unit), file=self.stream, flush=True)

    def close(self) -> None:
        self._write(self.clock())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(desc: str, total: int | None, unit: str = "items", stream: TextIO | None = None):
    """A progress counter with ``update(n)``, used as a context manager: tqdm's bar when ``stream`` (stderr) is a
    terminal, else :class:`LogProgress` lines every few seconds."""
    stream = stream if stream is not None else sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=f" {unit}", mininterval=1.0, file=stream)
    return LogProgress(desc, total, unit, stream=stream)


def iterate(items: Iterable[T], desc: str, total: int | None = None, unit: str = "items") -> Iterator[T]:
    """``items`` with :func:`progress` counting one per item."""
    with progress(desc, total, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
