"""Progress: a tqdm bar on a terminal; elsewhere (stderr in a file or a pipe) a log line every
ten seconds with the count and the time left, as `hf download` does, so long work is never silent.

Both are off with --quiet (the CLI raises the log level) or when KEDIT_DISABLE_PROGRESS_BARS is
set (that variable wins over everything). Work shorter than ten seconds prints no line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm.auto import tqdm

log = logging.getLogger("kedit.core.progress")
LINE_EVERY_S = 10.0
_disabled = False


def disable_progress_bars() -> None:
    global _disabled
    _disabled = True


def _switched_off() -> bool:
    return _disabled or os.environ.get("KEDIT_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes")


def progress_enabled() -> bool:
    """Whether a bar can be drawn: stderr is a terminal and nobody switched progress off."""
    return not _switched_off() and sys.stderr.isatty()


def human_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """The part of tqdm's interface kedit uses (iterate, update, set_postfix, close, `with`), as log lines."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "working",
                 initial: int = 0, unit: str = "it", every: float = LINE_EVERY_S, **_bar_only: Any) -> None:
        self.iterable = iterable
        self.total = total if total is not None or iterable is None or not hasattr(iterable, "__len__") \
            else len(iterable)
        self.desc, self.unit, self.every = desc, unit, every
        self.n = self.initial = initial
        self.started = self.last_line = time.monotonic()
        self.postfix = ""

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.every:
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """`desc: n/total unit (p%), about T left`; without a total, the count and the rate."""
        done, elapsed = self.n - self.initial, now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        extra = f" [{self.postfix}]" if self.postfix else ""
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {rate:.3g} {self.unit}/s{extra}"
        left = f", about {human_duration((self.total - self.n) / rate)} left" if rate > 0 else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%){left}{extra}"

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def progress_bar(iterable: Iterable[Any] | None = None, *, disable: bool = False,
                 **kwargs: Any) -> tqdm | ProgressLines:
    """A tqdm bar on stderr when one can be drawn; periodic log lines otherwise (unless switched off).

    tqdm is imported here, not with the CLI: it reads TQDM_DISABLE once, when imported, and the CLI
    sets that variable first when no bar can be drawn (kedit.cli.terminal.silence_libraries).
    """
    from tqdm.auto import tqdm

    if progress_enabled() and not disable:
        return tqdm(iterable, file=sys.stderr, leave=False, **kwargs)
    if _switched_off():
        return tqdm(iterable, disable=True, **kwargs)
    return ProgressLines(iterable, **kwargs)
