"""`kedit config`: settings per repository and per user, as git's.

Two files in git's INI format (`[user]` / `name = Ada`): the repository's `.kedit/config` and
the global `$XDG_CONFIG_HOME/kedit/config` (`~/.config/kedit/config` when XDG_CONFIG_HOME is
unset). A value set in the repository wins over the global one. Only the keys of `KEYS` are
accepted, each value checked when it is set; files are replaced atomically (temp file +
rename) under a lock, so a crash or a second writer never leaves half a file.

Calling sequence: `get(key, repo_dir)`, `values(repo_dir)`, `set_value(path, key, value)`,
`unset(path, key)` (the path: `repo_path(repo_dir)` or `global_path()`); `author(repo_dir)`
is the author recorded in new commits.
"""

from __future__ import annotations

import configparser
import getpass
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

from kedit.core.errors import KeditError

CONFIG_FILE = "config"


def _text(value: str) -> str:
    if not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("it must be non-empty text on one line")
    return value.strip()


def _email(value: str) -> str:
    if not re.fullmatch(r"[^\s<>@]+@[^\s<>@]+", value.strip()):
        raise ValueError("it is not an e-mail address (name@host)")
    return value.strip()


def _positive_int(value: str) -> str:
    if not re.fullmatch(r"\s*[1-9][0-9]*\s*", value):
        raise ValueError("it must be a positive whole number")
    return value.strip()


KEYS: dict[str, tuple[Callable[[str], str], str]] = {
    "user.name": (_text, "your name, recorded as the author of your commits"),
    "user.email": (_email, "your e-mail address, recorded with your name"),
    "edit.method": (_text, "the method of 'kedit edit' when --method is not given"),
    "stats.samples": (_positive_int, "the texts behind the covariance statistics of 'kedit stats' and 'kedit edit'"),
    "core.pager": (_text, "the pager for long output"),
}


def check_key(key: str) -> str:
    if key not in KEYS:
        raise KeditError(f"unknown config key {key!r}; known keys: {', '.join(KEYS)}")
    return key


def check_value(key: str, value: str, check: Callable[[str], str] | None = None) -> str:
    """The key's value as it will be stored; KeditError for an unknown key or a bad value.

    `check` is a further test from a layer above (the CLI checks that `edit.method` names a
    registered method: the engine knows no methods); it raises ValueError as KEYS' checks do.
    """
    check_key(key)
    try:
        stored = KEYS[key][0](value)
        return check(stored) if check else stored
    except ValueError as e:
        raise KeditError(f"bad value for {key}: {e}") from None


def global_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kedit" / CONFIG_FILE


def repo_path(repo_dir: Path) -> Path:
    """The repository's config file (`repo_dir` is its .kedit folder)."""
    return repo_dir / CONFIG_FILE


def read(path: Path) -> dict[str, str]:
    """The keys set in one file (`section.name` -> value); an unreadable file is one error line."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise KeditError(f"cannot read the config file {path}: {str(e).splitlines()[0]}",
                         hint="fix or remove it") from None
    return {f"{section}.{name}": value for section in parser.sections() for name, value in parser[section].items()}


def values(repo_dir: Path | None) -> dict[str, str]:
    """The settings in effect: global ones, overridden by the repository's."""
    merged = read(global_path())
    if repo_dir is not None:
        merged.update(read(repo_path(repo_dir)))
    return merged


def get(key: str, repo_dir: Path | None) -> str | None:
    check_key(key)
    return values(repo_dir).get(key)


def _write(path: Path, change: Callable[[dict[str, str]], None]) -> None:
    from filelock import FileLock  # here: only writers lock; the import takes ~15 ms of every command

    from kedit.core.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=10):
        found = read(path)
        change(found)
        parser = configparser.ConfigParser(interpolation=None)
        for key, value in sorted(found.items()):
            section, name = key.split(".", 1)
            if not parser.has_section(section):
                parser.add_section(section)
            parser[section][name] = value
        out = io.StringIO()
        parser.write(out)
        atomic_write_bytes(path, out.getvalue().encode("utf-8"))


def set_value(path: Path, key: str, value: str, check: Callable[[str], str] | None = None) -> str:
    stored = check_value(key, value, check)
    _write(path, lambda found: found.__setitem__(key, stored))
    return stored


def unset(path: Path, key: str) -> None:
    check_key(key)

    def remove(found: dict[str, str]) -> None:
        if key not in found:
            raise KeditError(f"{key} is not set in {path}")
        del found[key]

    _write(path, remove)


def author(repo_dir: Path | None) -> str:
    """Who new commits are by: $KEDIT_AUTHOR, else `user.name <user.email>` from the config
    (the repository's over the global one), else the login name."""
    if os.environ.get("KEDIT_AUTHOR"):
        return os.environ["KEDIT_AUTHOR"]
    settings = values(repo_dir)
    name = settings.get("user.name")
    if name is None:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = "unknown"
    email = settings.get("user.email")
    return f"{name} <{email}>" if email else name
