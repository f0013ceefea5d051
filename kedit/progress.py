"""Progress bars: tqdm on stderr, off when not a terminal, in --json/--quiet modes, or when
KEDIT_DISABLE_PROGRESS_BARS is set (that variable wins over everything)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_disabled = False


def disable_progress_bars() -> None:
    global _disabled
    _disabled = True


def progress_enabled() -> bool:
    if os.environ.get("KEDIT_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes"):
        return False
    return not _disabled and sys.stderr.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that honours kedit's switches."""
    return tqdm(iterable, disable=disable or not progress_enabled(), file=sys.stderr, leave=False, **kwargs)
