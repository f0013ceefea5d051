"""Commands for trained editors: train-editor, editors."""

from __future__ import annotations

import math
from pathlib import Path

import click

from kedit.cli.common import MethodChoice, check_device, command, json_option, open_repo, parse_overrides
from kedit.cli.jsonout import emit_json
from kedit.core.progress import progress_enabled
from kedit.core.refs import short_id

_SCORES = ("reliability", "generalization", "locality")


def _scores(metrics: dict) -> str:
    parts = []
    for name in _SCORES:
        value = metrics.get(f"val_{name}")
        if isinstance(value, int | float) and not math.isnan(value):
            parts.append(f"{name[:3]}={value:.2f}")
    return " ".join(parts)


@command(name="train-editor")
@click.option("--method", type=MethodChoice("editor"), default="mend", show_default=True,
              help="A method that declares a trained editor (mend: one editor for edits of one kind; "
                   "instructedit: many task families, with instructions).")
@click.option("--data", "data", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training records (repeatable): kedit/EasyEdit JSON(L), CounterFact, zsRE (MEND format), "
                   "KnowEdit; a record's `task` (or `type`) field names its task family.")
@click.option("--val", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Validation records (default: val_size records spread evenly over the training data).")
@click.option("--set", "overrides", multiple=True,
              help="Override a training hyper-parameter: key=value (layers, rank, lr, batch_size, max_steps, "
                   "max_minutes, ...).")
@click.option("--hparams", "hparams_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training hyper-parameters from a YAML file.")
@click.option("--device", default="auto", show_default=True, callback=check_device,
              help="auto (a GPU when there is one), cpu, cuda, cuda:N.")
@click.option("--restart", is_flag=True, help="Ignore this run's checkpoint and start over.")
@json_option
@click.pass_context
def train_editor(ctx: click.Context, method: str, data: tuple[Path, ...], val: Path | None,
                 overrides: tuple[str, ...], hparams_file: Path | None, device: str, restart: bool,
                 as_json: bool) -> None:
    """Train an editor (MEND, InstructEdit, ...) for the repository's base model and store it.

    Checkpoints under .kedit/training/; running the same command again resumes. Stops early
    when the validation loss stops improving.

    \b
    Example:
        kedit train-editor --method mend --data facts.json --set max_minutes=60
        kedit train-editor --method instructedit --data cf.json --data sentiment.jsonl
        kedit edit --method mend --prompt "..." --subject ... --target ...
    """
    from kedit.edit.trained import TrainOptions
    from kedit.edit.trained import train_editor as run

    repo = open_repo(ctx)
    info = run(repo, TrainOptions(method=method, data=data, val=val, overrides=parse_overrides(overrides),
                                  hparams_file=hparams_file, device=device, restart=restart,
                                  progress=progress_enabled()))
    if as_json:
        emit_json(editor=info.__dict__)
        return
    m = info.metrics
    click.echo(f"editor {info.short} ({info.method}): {_scores(m)}; {m.get('steps')} steps, "
               f"{m.get('train_seconds')} s, stopped: {m.get('stopped')}")


@command(name="editors")
@click.option("--method", type=MethodChoice("editor"), help="Only editors of this method.")
@json_option
@click.pass_context
def editors(ctx: click.Context, method: str | None, as_json: bool) -> None:
    """List the trained editors, newest first, with their validation scores and the commits that used them.

    \b
    Example:
        kedit editors --json
    """
    from kedit.edit.trained import list_editors

    repo = open_repo(ctx)
    found = list_editors(repo, method)
    if as_json:
        emit_json(editors=[e.__dict__ for e in found])
        return
    for e in found:
        m = e.metrics
        click.echo(f"{e.short}  {e.method:<12} {e.created[:19]}  {_scores(m):<30} steps={m.get('steps')} "
                   f"data={short_id(e.data_hash)} base={short_id(e.base_commit)} used-by={len(e.used_by)}")
