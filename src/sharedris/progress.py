"""Progress reporting that suits both a terminal and a log file.

On a terminal, :func:`progress` is a tqdm bar. When stderr is not a terminal (CI, ``nohup``, a
pipe), a tqdm bar would write one line per refresh; there :func:`progress` returns a
:class:`LineProgress`, which prints a plain line at most every ``interval`` seconds and a summary
line when it closes.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL = 5.0


def write(text: str, file: TextIO | None = None) -> None:
    """Print ``text`` as a line (stdout by default) without breaking a progress bar on a terminal."""
    tqdm.write(text, file=file)


class LineProgress:
    """The small part of tqdm's interface used here, as plain rate-limited lines.

    Args:
        iterable: what to iterate over, or None to count with :meth:`update`.
        total: the number of steps; ``len(iterable)`` when that exists.
        desc: the name printed at the start of every line.
        initial: steps already done (a resumed run).
        interval: least number of seconds between two progress lines.
        file: where lines go (stderr by default).
        clock: seconds as a float; injectable so tests need not sleep.
        unit: what is counted (``"B"`` for a download); with ``unit_scale`` counts and rates are
            shown in decimal units ("12.3 MB", "1.5 MB/s"), as tqdm does.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, interval: float = DEFAULT_INTERVAL, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, unit: str = "it", unit_scale: bool = False) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc = iterable, total, desc
        self.n = self.initial = initial
        self.interval, self.file, self.clock = interval, file, clock
        self.unit, self.unit_scale = unit, unit_scale
        self.postfix = ""
        self.start = self.last_print = clock()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress counts with update(); give an iterable to iterate")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; print a line if ``interval`` seconds passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self.last_print >= self.interval:
            self.last_print = now
            self._print(self._line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown at the end of each line, e.g. ``loss=0.31`` (``refresh`` is tqdm's; ignored)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        """Print ``text`` as its own line on stdout, as tqdm's ``write`` does."""
        write(text)

    def close(self) -> None:
        """Print the summary line (once)."""
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        self._print(self._line(now, done=True))

    def _line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.start
        count = f"{self._count(self.n)}/{self._count(self.total)}" if self.total is not None else self._count(self.n)
        parts = [f"{self.desc}: " if self.desc else "", "done, " if done else "", count]
        if self.total and not done:
            parts.append(f" ({100 * self.n / self.total:.0f}%)")
        parts.append(f" in {_duration(elapsed)}")
        if elapsed > 0 and self.n > self.initial:
            rate = (self.n - self.initial) / elapsed
            if self.unit_scale:
                parts.append(f", {self._count(rate)}/s")
            else:
                parts.append(f", {rate:.3g} {self.unit}/s" if rate >= 1 else f", {1 / rate:.3g} s/{self.unit}")
            if self.total is not None and not done and self.n < self.total:
                parts.append(f", {_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(f" | {self.postfix}")
        return "".join(parts)

    def _count(self, n: float) -> str:
        if not self.unit_scale:
            return f"{n:g}" if isinstance(n, float) else str(n)
        if n < 1000:
            return f"{n:.0f} {self.unit}"
        exponent = min(4, int(math.log10(n) // 3))
        return f"{n / 1000 ** exponent:.1f} {'kMGT'[exponent - 1]}{self.unit}"

    def _print(self, line: str) -> None:
        print(line, file=self.file or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", disable: bool = False,
             initial: int = 0, interval: float = DEFAULT_INTERVAL, file: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic, **tqdm_options: Any) -> tqdm | LineProgress:
    """A progress bar over ``iterable`` (or counted with ``update``): tqdm on a terminal, else plain lines.

    Args:
        iterable, total, desc, disable, initial: as in tqdm.
        interval: non-terminal only, least seconds between two lines.
        file: where progress goes; stderr by default. Whether it is a terminal picks the kind.
        clock: non-terminal only, the time source (tests inject one).
        tqdm_options: display options passed to tqdm on a terminal (``leave``, ``dynamic_ncols``,
            ``unit``, ``unit_scale``); plain lines use ``unit`` and ``unit_scale`` too.
    Returns:
        An object with ``update``, ``set_postfix``, ``write``, ``close`` and iteration. When
        ``disable`` is true, a disabled tqdm (nothing is printed) whatever the output.
    """
    stream = file or sys.stderr
    if disable or getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, disable=disable, initial=initial, file=stream, **tqdm_options)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, interval=interval, file=stream,
                        clock=clock, unit=tqdm_options.get("unit", "it"),
                        unit_scale=bool(tqdm_options.get("unit_scale", False)))
