"""The `kedit` command line: wiring only. The root group and its global options live here; the
commands come from one module per noun (`history.py`, `branch.py`, `edit.py`, ...), each a thin
click wrapper over the library, sharing `common.py`. Nothing imports this module back.

Data goes to stdout (human text, or JSON with --json); messages and progress to stderr.
Every KeditError becomes one line, `kedit: error: ...`, and exit status 1 (2 for `diff`,
whose 1 means "differs"); set KEDIT_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from kedit.cli import behaviour, branch, config, edit, editors, eval, history, hub, maintenance, model, ui
from kedit.cli.common import KeditGroup, be_quiet
from kedit.cli.terminal import (
    COLOR_MODES,
    PAGED_COMMANDS,
    color_setting,
    configured_pager,
    exit_closed_pipe,
    silence_libraries,
    start_pager,
)
from kedit.core.progress import progress_enabled


@click.group(cls=KeditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", "repo_path", type=click.Path(path_type=Path), envvar="KEDIT_DIR",
              help="The repository: a folder holding .kedit (default: the current folder or a parent).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages (also accepted after the command).")
@click.option("--json", "as_json", is_flag=True, help="JSON output, for commands that have it (as their --json).")
@click.option("--color", "color", type=click.Choice(COLOR_MODES), default="auto", show_default=True,
              help="Colour: auto (on a terminal, unless NO_COLOR is set), always or never.")
@click.option("--no-pager", is_flag=True, help="Do not page long output (log, show, diff, reflog).")
@click.version_option(package_name="kedit")
@click.pass_context
def cli(ctx: click.Context, repo_path: Path | None, quiet: bool, as_json: bool, color: str, no_pager: bool) -> None:
    """Version control for the knowledge inside a language model.

    \b
    Example:
        kedit init                      # the embedded SmolLM2-135M-Instruct
        kedit log --oneline
        kedit diff HEAD~1 HEAD
        kedit revert HEAD
    """
    ctx.ensure_object(dict)
    ctx.obj["repo_path"] = repo_path
    ctx.obj["quiet"] = quiet
    ctx.obj["json"] = as_json
    ctx.color = color_setting(color)
    logging.basicConfig(format="kedit: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
    if quiet:
        be_quiet(ctx)
    if ctx.invoked_subcommand in PAGED_COMMANDS and not no_pager and not as_json:
        if ctx.color is None and sys.stdout.isatty():
            ctx.color = True  # the pager (less -R) shows the colours the terminal would have
        start_pager(configured_pager(repo_path))
    # -q after the subcommand is parsed later, so libraries are silenced on the terminal's own terms
    silence_libraries(progress=progress_enabled())


COMMANDS = [
    model.init, model.export,
    history.log, history.show, history.status, history.reflog, history.diff,
    behaviour.blame, behaviour.bisect,
    branch.checkout, branch.reset, branch.branch, branch.tag, branch.revert, branch.merge, branch.cherry_pick,
    branch.rebase,
    maintenance.fsck, maintenance.gc,
    edit.edit, edit.stats,
    eval.eval_, eval.check, eval.probe,
    editors.train_editor, editors.editors,
    hub.remote, hub.push, hub.fetch, hub.pull, hub.clone,
    config.config_,
    ui.ui, ui.report,
]
for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    try:
        try:
            cli(prog_name="kedit")
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is seen
    except BrokenPipeError:
        exit_closed_pipe()

