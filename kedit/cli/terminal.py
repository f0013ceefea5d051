"""git's terminal habits: a pager for long output, colour that honours NO_COLOR, quiet closed pipes,
and no library noise.

The CLI calls these from its top-level group only; commands keep writing with `click.echo`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import click

from kedit.core import config
from kedit.core.db import find_repository
from kedit.core.errors import KeditError

# Commands whose output can run to hundreds of lines, paged on a terminal as git pages them.
PAGED_COMMANDS = frozenset({"log", "show", "diff", "reflog", "blame"})
DEFAULT_PAGER = "less -FRX"  # quit if one screen, keep colours, leave the text on screen
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, as git and other Unix tools exit when the reader goes away
COLOR_MODES = ("auto", "always", "never")
NOISY_LOGGERS = ("httpx", "httpx2", "urllib3", "huggingface_hub", "transformers", "filelock", "accelerate")


def debug_enabled() -> bool:
    """KEDIT_DEBUG set (and not 0): tracebacks and library warnings reach the user."""
    return os.environ.get("KEDIT_DEBUG", "") not in ("", "0")


def color_setting(mode: str) -> bool | None:
    """click's `color` for --color MODE: True forces, False strips, None lets click ask isatty.

    In auto mode a non-empty NO_COLOR turns colour off (https://no-color.org).
    """
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR", ""):
        return False
    return None


def pager_command(configured: str | None = None) -> str | None:
    """KEDIT_PAGER, then the `core.pager` setting (`configured`), then PAGER, then `less -FRX`, in
    git's order; None when the first one set is "" or "cat" (git's "no pager")."""
    for command in (os.environ.get("KEDIT_PAGER"), configured, os.environ.get("PAGER")):
        if command is not None:
            return None if command.strip() in ("", "cat") else command.strip()
    return DEFAULT_PAGER


def configured_pager(repo_path: Path | None) -> str | None:
    """The `core.pager` setting, the repository's over the global one (outside a repository, the
    global one); None when it is unset or a config file cannot be read (the command says so)."""
    try:
        repo_dir = find_repository(repo_path or Path.cwd())
    except KeditError:
        repo_dir = None
    try:
        return config.values(repo_dir).get("core.pager")
    except KeditError:
        return None


def start_pager(configured: str | None = None) -> bool:
    """Send the rest of stdout through the pager, if stdout is a terminal; True if one started.

    Like git, the pager reads file descriptor 1 through a pipe, so every write (click, print,
    a library) is paged; on exit stdout is closed and kedit waits for the reader to quit.
    """
    command = pager_command(configured)
    if command is None or not sys.stdout.isatty():
        return False
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    try:
        pager = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, env=env)
    except OSError as e:
        click.echo(f"kedit: warning: pager {shlex.quote(command)} did not start ({e}); not paging", err=True)
        return False
    sys.stdout.flush()
    terminal_fd = os.dup(1)
    os.dup2(pager.stdin.fileno(), 1)
    pager.stdin.close()

    def stop() -> None:
        with contextlib.suppress(BrokenPipeError):  # the reader quit early: nothing more to show
            sys.stdout.flush()
        os.dup2(terminal_fd, 1)  # drops the last write end: the pager sees end of file
        pager.wait()

    atexit.register(stop)
    return True


def exit_closed_pipe() -> None:
    """Leave silently with status 141 when the reader of stdout has gone (`kedit log | head -1`).

    stdout is pointed at /dev/null first, so the interpreter's final flush cannot complain.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_CLOSED_PIPE)


def silence_libraries(*, progress: bool) -> None:
    """Keep library warnings and progress bars off the user's screen unless KEDIT_DEBUG is set.

    Without `progress` (stderr not a terminal, or --quiet), tqdm bars of the libraries are off
    too: transformers draws its GGUF dequantisation bar with plain tqdm, which only TQDM_DISABLE
    reaches, and `\\r` redraws do not belong in a log file.
    """
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    if debug_enabled():
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
