"""What every command module shares: the command and group classes, opening the repository,
output (`say` to stderr; JSON in kedit/cli/jsonout.py), common options and argument parsers.

`kedit/cli/__init__.py` only wires the commands together; nothing imports it back.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import click

from kedit.cli.completion import add_completion
from kedit.cli.terminal import debug_enabled, exit_closed_pipe
from kedit.core.errors import KeditError, MethodNotFoundError
from kedit.core.names import DTYPE_NAMES
from kedit.core.progress import disable_progress_bars

EXIT_ERROR = 1
MAX_COUNT = 2**63 - 1  # SQLite's largest integer
MAX_AGE = timedelta(days=100 * 365)  # older than any repository; larger ages overflow date arithmetic


def error_line(e: BaseException) -> str:
    """The one line a user sees for an error (a message that spans lines is joined into one)."""
    return re.sub(r"\s*\n\s*", " ", _error_text(e))


def _error_text(e: BaseException) -> str:
    if isinstance(e, KeditError):
        hint = f" (hint: {e.hint})" if e.hint else ""
        return f"kedit: error: {e}{hint}"
    if isinstance(e, click.UsageError):  # bad arguments or options: click's own check
        where = f" (hint: {e.ctx.command_path} --help)" if e.ctx else ""
        return f"kedit: error: {e.format_message()}{where}"
    if isinstance(e, click.ClickException):
        return f"kedit: error: {e.format_message()}"
    if isinstance(e, sqlite3.DatabaseError):
        return f"kedit: error: the history database cannot be used ({e}) (hint: run 'kedit fsck')"
    if isinstance(e, OSError):
        return f"kedit: error: {e.strerror or e}: {e.filename or ''}".rstrip(": ")
    return f"kedit: error: internal error {type(e).__name__}: {e} (set KEDIT_DEBUG=1 for the traceback)"


def die(e: BaseException, code: int = EXIT_ERROR) -> NoReturn:
    if debug_enabled():
        raise e
    click.echo(error_line(e), err=True)
    sys.exit(code)


def be_quiet(ctx: click.Context) -> None:
    """-q, wherever it was given: no progress bars, no messages, only warnings in the log."""
    ctx.find_root().ensure_object(dict)["quiet"] = True
    disable_progress_bars()
    logging.getLogger().setLevel(logging.WARNING)


def _quiet_after_subcommand(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        be_quiet(ctx)


class KeditCommand(click.Command):
    """A subcommand that also takes the global -q/--quiet after its name (`kedit log -q`), turns
    the global --json (`kedit --json log`) into its own, and completes revisions in the shell."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        taken = {opt for p in self.params for opt in p.opts}
        if not taken & {"-q", "--quiet"}:  # diff has its own --quiet (no output, as git's)
            self.params.append(click.Option(["-q", "--quiet", "global_quiet"], is_flag=True, expose_value=False,
                                            callback=_quiet_after_subcommand, help="No progress bars or messages."))
        add_completion(self)

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.find_root().obj.get("json"):
            if "as_json" not in ctx.params:
                raise click.UsageError(f"'{ctx.command_path}' has no JSON output", ctx)
            ctx.params["as_json"] = True
        return super().invoke(ctx)


class KeditGroup(click.Group):
    """Every error, click's usage errors included, ends as one `kedit: error:` line."""

    command_class = KeditCommand
    group_class = type  # subgroups (remote, probe) are KeditGroups with KeditCommands

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:  # `kedit` alone: the help, as click shows it
            raise
        except click.ClickException as e:  # the options before the command name
            die(e, e.exit_code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:  # `kedit probe` alone
            raise
        except click.ClickException as e:
            die(e, e.exit_code)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("kedit: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            exit_closed_pipe()
        except Exception as e:
            die(e, (ctx.obj or {}).get("exit_code", EXIT_ERROR))


command = functools.partial(click.command, cls=KeditCommand)
group = functools.partial(click.group, cls=KeditGroup)


def open_repo(ctx: click.Context):
    from kedit.repository import Repository

    return Repository.open(ctx.obj["repo_path"])


def say(ctx: click.Context, message: str) -> None:
    if not ctx.obj["quiet"]:
        click.echo(message, err=True)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")(f)




def ref_decorations(repo: Any) -> dict[str, list[str]]:
    """The refs at each commit, as `log` decorates it: `HEAD -> main`, `tag: v1`, `HEAD` when detached."""
    out: dict[str, list[str]] = {}
    head_branch = repo.head_branch()
    if head_branch is None and repo.head():
        out.setdefault(repo.head(), []).append("HEAD")
    for name, target in repo.refs.branches().items():
        out.setdefault(target, []).append(f"HEAD -> {name}" if name == head_branch else name)
    for name, target in repo.refs.tags().items():
        out.setdefault(target, []).append(f"tag: {name}")
    return out


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 500MB or 5GB")
    size = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))
    if size < 1:
        raise click.BadParameter(f"{text!r}: a size must be at least 1 byte")
    return size


def parse_age(text: str) -> timedelta:
    if text == "now":
        return timedelta(0)
    m = re.fullmatch(r"(\d+)\s*([smhdw])", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not an age like now, 30m, 12h, 14d or 2w")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
    if seconds > MAX_AGE.total_seconds():
        raise click.BadParameter(f"{text!r} is longer than {MAX_AGE.days // 365} years")
    return timedelta(seconds=seconds)


def check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """A device torch has here: refused before any model is loaded, not after."""
    if value == "auto":
        return value
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise click.BadParameter(f"{value!r} is not a device kedit runs on: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise click.BadParameter(f"{value!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter(f"{value!r}: torch sees no MPS device here")
    return value



class MethodChoice(click.Choice):
    """The registered methods (with `capability`, kedit/core/plugins.py) as --method's choices.

    Read from the registry's metadata when click first needs them (checking a value, --help,
    completion), so only the commands given --method pay for the scan, and nothing imports a method."""

    def __init__(self, capability: str | None = None) -> None:
        super().__init__(())
        self.capability = capability

    @property
    def choices(self) -> tuple[str, ...]:
        from kedit.methods.registry import method_names

        return tuple(method_names(self.capability))

    @choices.setter
    def choices(self, _value: tuple[str, ...]) -> None:
        """click.Choice assigns its choices when built; these are always the registry's."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """An unknown method is kedit's error (exit 1), as an unknown `edit.method` is; a known one
        without the capability this option needs is a usage error (exit 2)."""
        if value in self.choices:
            return value
        from kedit.methods.registry import method_names

        if self.capability is not None and value in method_names():
            self.fail(f"method {value!r} does not declare {self.capability!r}; methods that do: "
                      f"{', '.join(self.choices)}", param, ctx)
        raise MethodNotFoundError(f"unknown method {value!r}; known methods: {', '.join(method_names())}")


device_option = click.option("--device", default="cpu", show_default=True, callback=check_device,
                             help="cpu, cuda, cuda:N, or auto (spread a large model over GPUs and CPU).")
dtype_option = click.option("--dtype", default=None, type=click.Choice(DTYPE_NAMES),
                            help="Compute dtype (default: as stored).")
chat_option = click.option("--chat", is_flag=True,
                           help="Send each prompt as a user message through the tokenizer's chat template "
                                "(its own scores and protocol, chat_template_*).")


def parse_prompt_answer(text: str) -> tuple[str, str | None]:
    """'PROMPT=>ANSWER', or just PROMPT (answer None)."""
    prompt, sep, answer = text.partition("=>")
    return (prompt.strip(), answer.strip() if sep else None)


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--set")
        out[key.strip()] = value.strip()
    return out



def greedy_answer(model, tok, prompt: str, n_tokens: int = 4) -> str:
    from kedit.eval.metrics import greedy_continuations

    return greedy_continuations(model, tok, [prompt], n_tokens)[0].strip()

