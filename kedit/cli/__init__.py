"""The `kedit` command line: thin click wrappers over `kedit.core.repo.Repository`.

Data goes to stdout (human text, or JSON with --json); messages and progress to stderr.
Every KeditError becomes one line, `kedit: error: ...`, and exit status 1 (2 for `diff`,
whose 1 means "differs"); set KEDIT_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from kedit.cli.completion import add_completion
from kedit.cli.terminal import (
    COLOR_MODES,
    PAGED_COMMANDS,
    color_setting,
    debug_enabled,
    exit_closed_pipe,
    silence_libraries,
    start_pager,
)
from kedit.core.errors import KeditError
from kedit.core.progress import disable_progress_bars, progress_enabled

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
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


def _die(e: BaseException, code: int = EXIT_ERROR) -> NoReturn:
    if debug_enabled():
        raise e
    click.echo(error_line(e), err=True)
    sys.exit(code)


def _be_quiet(ctx: click.Context) -> None:
    """-q, wherever it was given: no progress bars, no messages, only warnings in the log."""
    ctx.find_root().ensure_object(dict)["quiet"] = True
    disable_progress_bars()
    logging.getLogger().setLevel(logging.WARNING)


def _quiet_after_subcommand(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _be_quiet(ctx)


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
            _die(e, e.exit_code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:  # `kedit probe` alone
            raise
        except click.ClickException as e:
            _die(e, e.exit_code)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("kedit: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            exit_closed_pipe()
        except Exception as e:
            _die(e, (ctx.obj or {}).get("exit_code", EXIT_ERROR))


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
        _be_quiet(ctx)
    if ctx.invoked_subcommand in PAGED_COMMANDS and not no_pager and not as_json:
        if ctx.color is None and sys.stdout.isatty():
            ctx.color = True  # the pager (less -R) shows the colours the terminal would have
        start_pager()
    # -q after the subcommand is parsed later, so libraries are silenced on the terminal's own terms
    silence_libraries(progress=progress_enabled())


def _open(ctx: click.Context):
    from kedit.core.repo import Repository

    return Repository.open(ctx.obj["repo_path"])


def _say(ctx: click.Context, message: str) -> None:
    if not ctx.obj["quiet"]:
        click.echo(message, err=True)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")(f)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


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


# -- init ------------------------------------------------------------------------------------


@cli.command()
@click.argument("model", required=False)
@click.option("--no-copy", is_flag=True, help="Keep a verified reference to the safetensors files instead of a copy.")
@click.option("--bare", is_flag=True, help="No working model folder (.kedit/worktree).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="Store the base in this dtype.")
@click.option("-m", "--message", help="Message of the initial commit.")
@click.pass_context
def init(ctx: click.Context, model: str | None, no_copy: bool, bare: bool, dtype: str, message: str | None) -> None:
    """Make MODEL a repository: hash every tensor and store the base.

    MODEL is a Hugging Face folder, a .safetensors file, a .gguf file or a model id in the
    local Hugging Face cache; without it, the embedded SmolLM2-135M-Instruct.

    \b
    Example:
        kedit init                       # embedded default
        kedit init ./my-model --no-copy  # reference the safetensors in place
    """
    import torch

    from kedit.core.repo import Repository

    torch_dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    repo = Repository.init(ctx.obj["repo_path"], model, copy=not no_copy, worktree=not bare, dtype=torch_dtype,
                           progress=progress_enabled(), message=message)
    head = repo.log(limit=1)[0]
    manifest = repo.manifest()
    total = sum(e.nbytes for e in manifest.values())
    _say(ctx, f"Initialised kedit repository in {repo.path}")
    click.echo(f"[{repo.head_branch()} {head.short}] {head.message}: {len(manifest)} tensors, {human_bytes(total)}")


# -- log, show, status -------------------------------------------------------------------------

SHORT_METRICS = {"reliability": "rel", "generalization": "gen", "locality": "loc", "portability": "port",
                 "efficacy": "eff", "paraphrase": "para", "neighbourhood": "nbhd", "fluency": "flu",
                 "gen_efficacy": "geff", "gen_paraphrase": "gpara", "gen_locality": "gloc"}


def _decorations(repo) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    head_branch = repo.head_branch()
    if head_branch is None and repo.head():
        out.setdefault(repo.head(), []).append("HEAD")
    for name, target in repo.refs.branches().items():
        out.setdefault(target, []).append(f"HEAD -> {name}" if name == head_branch else name)
    for name, target in repo.refs.tags().items():
        out.setdefault(target, []).append(f"tag: {name}")
    return out


def _echo_per_request(metrics: list) -> None:
    """A batch commit's per-request scores, one line per request (all of them in --json)."""
    by_request: dict[str, list] = {}
    for m in metrics:
        by_request.setdefault(m.suite, []).append(m)
    for suite in sorted(by_request, key=lambda s: int(s.split()[1]))[:50]:
        click.echo(f"  {suite:<10} " + " ".join(f"{m.name}={m.value:.2f}" for m in by_request[suite]))
    if len(by_request) > 50:
        click.echo(f"  ... {len(by_request) - 50} more requests (kedit show --json)")


def _metric_summary(commit) -> str:
    parts = []
    for m in commit.metrics:
        if m.stage in ("post", "eval") and m.name in SHORT_METRICS and not m.suite.startswith("request "):
            parts.append(f"{SHORT_METRICS[m.name]}={m.value:.2f}")
    return " ".join(dict.fromkeys(parts))


def _commit_json(commit) -> dict:
    return {"id": commit.id, "parent": commit.parent, "depth": commit.depth, "kind": commit.kind,
            "method": commit.method, "message": commit.message, "author": commit.author, "created": commit.created,
            "hparams": commit.hparams, "requests": commit.requests, "info": commit.info,
            "metrics": [m.__dict__ for m in commit.metrics]}


def _oneline(commit, decorations: dict[str, list[str]]) -> str:
    deco = decorations.get(commit.id)
    deco_text = click.style(f" ({', '.join(deco)})", fg="yellow") if deco else ""
    metrics = _metric_summary(commit)
    kind = commit.method or commit.kind
    return (f"{click.style(commit.short, fg='yellow')}{deco_text} [{kind}] {commit.message}"
            + (f"  {click.style(metrics, fg='cyan')}" if metrics else ""))


@cli.command()
@click.argument("revs", nargs=-1)
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("-n", "--max-count", type=click.IntRange(0, MAX_COUNT), help="Show at most N commits.")
@click.option("--graph", is_flag=True, help="Draw every branch's history as a graph.")
@click.option("--grep", help="Only commits whose message matches this regular expression.")
@click.option("--author", help="Only commits whose author matches this regular expression.")
@click.option("--since", "--after", "since", help="Only commits made after this date or age (2 weeks ago).")
@click.option("--until", "--before", "until", help="Only commits made before this date or age.")
@click.option("--subject", help="Only edits whose requests name this subject.")
@click.option("--method", help="Only edits made with this method (rome, memit, ...).")
@json_option
@click.pass_context
def log(ctx: click.Context, revs: tuple[str, ...], oneline: bool, max_count: int | None, graph: bool,
        grep: str | None, author: str | None, since: str | None, until: str | None, subject: str | None,
        method: str | None, as_json: bool) -> None:
    """Show the edit history from REVS (default HEAD), newest first, with metrics.

    REVS are revisions (their histories together), ranges A..B (in B, not in A) and A...B
    (in one of them only), or ^A (not in A's history).

    \b
    Example:
        kedit log --oneline -n 10
        kedit log main..experiment
        kedit log --subject "Eiffel Tower" --method rome
        kedit log --graph
    """
    from kedit.core.revisions import CommitFilter, filtered, parse_when, select

    repo = _open(ctx)
    keep = CommitFilter(grep, author, parse_when(since) if since else None, parse_when(until) if until else None,
                       subject, method)
    if graph and (revs or keep != CommitFilter()):
        raise KeditError("--graph draws every branch: it takes no revisions or filters")
    if graph:
        from kedit.core.graph import render_graph

        commits = render_graph(repo, max_count)
        if as_json:
            _emit_json([_commit_json(c) for _, c in commits])
            return
        decorations = _decorations(repo)
        for prefix, commit in commits:
            click.echo(prefix + (_oneline(commit, decorations) if commit else ""))
        return
    ids = filtered(repo.db, select(repo.db, repo.refs, revs or ["HEAD"]), keep, max_count)
    commits = [repo.get_commit(c) for c in ids]
    if as_json:
        _emit_json([_commit_json(c) for c in commits])
        return
    decorations = _decorations(repo)
    for commit in commits:
        if oneline:
            click.echo(_oneline(commit, decorations))
            continue
        deco = decorations.get(commit.id)
        click.echo(click.style(f"commit {commit.id}", fg="yellow") + (f" ({', '.join(deco)})" if deco else ""))
        click.echo(f"Author: {commit.author}")
        click.echo(f"Date:   {commit.created}")
        if commit.method:
            click.echo(f"Method: {commit.method}")
        click.echo(f"\n    {commit.message}\n")
        if commit.metrics:
            click.echo("    " + "  ".join(f"{m.name}[{m.stage}]={m.value:.3f}" for m in commit.metrics) + "\n")


@cli.command()
@click.argument("rev", default="HEAD")
@json_option
@click.pass_context
def show(ctx: click.Context, rev: str, as_json: bool) -> None:
    """Show one commit: its request, method, hyper-parameters, metrics and per-tensor delta.

    \b
    Example:
        kedit show HEAD~2
    """
    repo = _open(ctx)
    commit = repo.get_commit(repo.resolve(rev))
    changes = repo.changes(commit.id)
    adapters = repo.db.execute("SELECT op, object_id, kind FROM adapter_ops WHERE commit_id = ? ORDER BY seq",
                               [commit.id]).fetchall()
    if as_json:
        body = _commit_json(commit)
        body["tensors"] = [{"name": c.name, "encoding": c.encoding, "rank": c.rank, "dtype": c.dtype,
                            "shape": list(c.shape), "delta_norm": c.delta_norm, "rel_change": c.rel_change,
                            "stored_bytes": c.stored_bytes, "hash": c.result_hash,
                            "steps": [s.__dict__ for s in c.steps]} for c in changes]
        body["adapters"] = [{"op": op, "object": oid, "kind": kind, "config": _adapter_config(repo, oid)}
                            for op, oid, kind in adapters]
        _emit_json(body)
        return
    click.echo(click.style(f"commit {commit.id}", fg="yellow"))
    click.echo(f"Parent: {commit.parent or '-'}")
    click.echo(f"Author: {commit.author}\nDate:   {commit.created}\nKind:   {commit.kind}")
    if commit.method:
        click.echo(f"Method: {commit.method}")
    click.echo(f"\n    {commit.message}\n")
    for i, request in enumerate(commit.requests):
        prompt = str(request.get("prompt", "")).replace("{}", str(request.get("subject", "")))
        click.echo(f"Request {i}: {prompt!r} -> {request.get('target_new')!r}"
                   + (f" (was {request['target_true']!r})" if request.get("target_true") else ""))
    if commit.hparams:
        click.echo("Hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(commit.hparams.items())))
    scalars = {k: v for k, v in commit.info.items() if isinstance(v, int | float | str | bool) and k != "note"}
    if scalars:
        click.echo("Diagnostics: " + ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}"
                                               for k, v in scalars.items()))
    if commit.metrics:
        click.echo("Metrics:")
        per_request = [m for m in commit.metrics if m.suite.startswith("request ")]
        for m in commit.metrics:
            if m not in per_request:
                suite = f" [{m.suite}]" if m.suite else ""
                source = f" (from {m.source}, not verified here)" if m.source else ""
                click.echo(f"  {m.name:<16} {m.stage:<5} {m.value:8.4f}  ({m.protocol}){suite}{source}")
        _echo_per_request(per_request)
    if changes:
        click.echo(f"Tensors ({len(changes)}):")
        click.echo(f"  {'name':<44} {'encoding':<8} {'rank':>5} {'|delta|':>10} {'rel':>9} {'stored':>10}")
        for c in changes[:200]:
            click.echo(f"  {c.name:<44} {c.encoding:<8} {c.rank if c.rank is not None else '-':>5} "
                       f"{_num(c.delta_norm):>10} {_num(c.rel_change):>9} {human_bytes(c.stored_bytes):>10}")
        if len(changes) > 200:
            click.echo(f"  ... and {len(changes) - 200} more (kedit show --json for all)")
    for op, oid, kind in adapters:
        config = _adapter_config(repo, oid)
        entries = config.get("entries", [])
        where = f", {config['module']}" if "module" in config else ""
        click.echo(f"Adapter {op}: {kind} {oid[:12]} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}{where})")
        for entry in entries:  # adapters may list what they hold, for people (GRACE: one per edit)
            head = f"{entry['prompt']!r} -> {entry['target']!r}  " if "prompt" in entry and "target" in entry else ""
            rest = "  ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in entry.items()
                             if k not in ("prompt", "target"))
            click.echo(f"  {head}{rest}")


def _adapter_config(repo: Any, object_id: str) -> dict:
    """An adapter object's JSON config (its tensors are not read by the engine)."""
    _, metadata = repo.store.get_tensors(object_id)
    return json.loads(metadata.get("config", "{}"))


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@cli.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the current branch and whether the working model matches HEAD."""
    repo = _open(ctx)
    info = repo.status()
    if as_json:
        _emit_json(info)
        return
    where = f"On branch {info['branch']}" if info["branch"] else f"HEAD detached at {info['head'][:12]}"
    click.echo(where)
    if "worktree" not in info:
        click.echo("No working model (bare repository)")
        return
    click.echo(f"Working model: {info['worktree']}")
    if info["worktree_commit"] != info["head"]:
        click.echo("  not at HEAD yet (the next kedit write command brings it there)")
    if info["modified"]:
        click.echo("Changed by hand (kedit checkout --force HEAD discards):")
        for name, what in sorted(info["modified"].items()):
            click.echo(f"  {what}: {name}")
    else:
        click.echo("Nothing changed: the working model is exactly HEAD")


# -- moving around ---------------------------------------------------------------------------


@cli.command()
@click.argument("rev")
@click.option("-f", "--force", is_flag=True, help="Overwrite tensors changed by hand in the working model.")
@click.pass_context
def checkout(ctx: click.Context, rev: str, force: bool) -> None:
    """Switch to a branch, or detach HEAD at a commit, updating only the tensors that differ.

    \b
    Example:
        kedit checkout experiment
        kedit checkout HEAD~3
    """
    repo = _open(ctx)
    commit_id = repo.checkout(rev, force=force)
    branch = repo.head_branch()
    _say(ctx, f"Switched to branch '{branch}'" if branch else f"HEAD is now at {commit_id[:12]} (detached)")


@cli.command()
@click.argument("rev")
@click.option("-f", "--force", is_flag=True, help="Overwrite tensors changed by hand in the working model.")
@click.pass_context
def reset(ctx: click.Context, rev: str, force: bool) -> None:
    """Move the current branch to REV. The old position stays in `kedit reflog`.

    \b
    Example:
        kedit reset HEAD~1      # drop the last edit from this branch
        kedit reset 'HEAD@{1}'  # undo that: where HEAD was before its last move
    """
    repo = _open(ctx)
    commit_id = repo.reset(rev, force=force)
    _say(ctx, f"HEAD is now at {commit_id[:12]}")


@cli.command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete the branch NAME.")
@json_option
@click.pass_context
def branch(ctx: click.Context, name: str | None, rev: str, delete: bool, as_json: bool) -> None:
    """List branches, create NAME at REV, or delete NAME with -d.

    \b
    Example:
        kedit branch experiment HEAD~2
        kedit branch -d experiment
    """
    repo = _open(ctx)
    if name is None:
        branches, current = repo.refs.branches(), repo.head_branch()
        if as_json:
            _emit_json({"current": current, "branches": branches})
            return
        for b, target in branches.items():
            click.echo(f"{'*' if b == current else ' '} {b:<24} {target[:12]}")
        return
    if delete:
        target = repo.delete_branch(name)
        _say(ctx, f"Deleted branch {name} (was {target[:12]})")
    else:
        target = repo.create_branch(name, rev)
        _say(ctx, f"Created branch {name} at {target[:12]}")


@cli.command()
@click.argument("name", required=False)
@click.argument("rev", default="HEAD")
@click.option("-d", "--delete", is_flag=True, help="Delete the tag NAME.")
@json_option
@click.pass_context
def tag(ctx: click.Context, name: str | None, rev: str, delete: bool, as_json: bool) -> None:
    """List tags, tag REV as NAME, or delete NAME with -d.

    \b
    Example:
        kedit tag before-batch-2
    """
    repo = _open(ctx)
    if name is None:
        tags = repo.refs.tags()
        if as_json:
            _emit_json(tags)
            return
        for t, target in tags.items():
            click.echo(f"{t:<24} {target[:12]}")
        return
    if delete:
        target = repo.delete_tag(name)
        _say(ctx, f"Deleted tag {name} (was {target[:12]})")
    else:
        target = repo.create_tag(name, rev)
        _say(ctx, f"Tagged {target[:12]} as {name}")


@cli.command()
@click.argument("rev")
@click.option("-m", "--message", help="Message of the revert commit.")
@click.pass_context
def revert(ctx: click.Context, rev: str, message: str | None) -> None:
    """Undo REV with a new commit whose tensors are recomputed from the history without it.

    Reverting never subtracts: later edits are replayed on the base without REV's delta, so
    reverting every edit gives the base bit for bit.

    \b
    Example:
        kedit revert HEAD~2
    """
    repo = _open(ctx)
    commit = repo.revert(rev, message=message)
    click.echo(f"[{repo.head_branch() or 'detached'} {commit.short}] {commit.message}")
    later = commit.info.get("later_commits", [])
    if later:
        _say(ctx, f"note: {len(later)} later edit(s) were made on a model that contained the reverted one; "
                  "re-evaluate them (kedit check)")


@cli.command()
@click.argument("ref", default="HEAD")
@click.option("-n", "--max-count", type=click.IntRange(0, MAX_COUNT), help="Show at most N entries.")
@json_option
@click.pass_context
def reflog(ctx: click.Context, ref: str, max_count: int | None, as_json: bool) -> None:
    """Show where REF (default HEAD) has pointed, newest first; each entry's name (HEAD@{1})
    is a revision."""
    repo = _open(ctx)
    entries = repo.reflog(ref, limit=max_count)
    if as_json:
        _emit_json(entries)
        return
    for i, e in enumerate(entries):
        click.echo(f"{(e['new'] or '-')[:12]} {ref}@{{{i}}}: {e['message']}")


# -- diff and export --------------------------------------------------------------------------


@cli.command()
@click.argument("rev_a")
@click.argument("rev_b", required=False)
@click.option("--stat", is_flag=True, help="Only the names of differing tensors.")
@click.option("--quiet", "quiet_diff", is_flag=True, help="No output; the exit status says it all.")
@json_option
@click.pass_context
def diff(ctx: click.Context, rev_a: str, rev_b: str | None, stat: bool, quiet_diff: bool, as_json: bool) -> None:
    """Per-tensor weight differences between REV_A and REV_B (default HEAD).

    REV_A may instead be a range: A..B compares A with B, A...B compares B with the commit
    where A and B diverged (their merge base).

    Exit status: 0 when the models are equal, 1 when they differ, 2 on error.

    \b
    Example:
        kedit diff HEAD~1 HEAD
        kedit diff main experiment --json
        kedit diff main...experiment
    """
    from kedit.core.diff import adapter_diff
    from kedit.core.diff import diff as compute_diff
    from kedit.core.revisions import diff_endpoints

    ctx.obj["exit_code"] = 2  # 1 means "the models differ"
    repo = _open(ctx)
    rev_a, rev_b = diff_endpoints(repo.refs, repo.db, rev_a, rev_b)
    diffs = compute_diff(repo, rev_a, rev_b)
    adapters = adapter_diff(repo, rev_a, rev_b)
    differ = bool(diffs or adapters["added"] or adapters["removed"])
    if as_json:
        _emit_json({"equal": not differ, "tensors": [d.to_dict() for d in diffs], "adapters": adapters})
    elif not quiet_diff:
        for d in diffs:
            if stat or d.status != "modified" or d.delta_norm is None:
                click.echo(f"{d.status:<9} {d.name}")
                continue
            click.echo(f"modified  {d.name:<44} |delta|={d.delta_norm:.4g} max={d.max_abs:.3g} "
                       f"rel={_num(d.rel_change)} changed={d.changed}/{d.numel}")
        for oid in adapters["added"]:
            click.echo(f"adapter+  {oid[:12]}")
        for oid in adapters["removed"]:
            click.echo(f"adapter-  {oid[:12]}")
        if not differ:
            _say(ctx, "no differences")
    sys.exit(1 if differ else 0)


@cli.command()
@click.argument("rev")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--max-shard-size", default="5GB", show_default=True, help="Split weights into shards above this.")
@click.option("-f", "--force", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@json_option
@click.pass_context
def export(ctx: click.Context, rev: str, directory: Path, max_shard_size: str, force: bool, as_json: bool) -> None:
    """Write REV as a normal checkpoint folder that transformers loads without kedit.

    \b
    Example:
        kedit export HEAD ./edited-model
        python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('./edited-model')"
    """
    from kedit.model.export import export as run_export

    repo = _open(ctx)
    result = run_export(repo, rev, directory, max_shard_bytes=parse_size(max_shard_size), force=force,
                        progress=progress_enabled())
    if as_json:
        _emit_json(result)
    else:
        click.echo(f"exported {result['commit'][:12]} to {result['path']} "
                   f"({result['tensors']} tensors in {len(result['shards'])} shard(s))")
        if result.get("adapters"):
            click.echo(f"with {result['adapters']} adapter(s): load it with kedit.load_model(path); "
                       "plain from_pretrained refuses it")


# -- maintenance -----------------------------------------------------------------------------


@cli.command()
@click.option("--repair", is_flag=True,
              help="Rebuild the rows, refs, reflog and working model that hashes prove, then check again.")
@json_option
@click.pass_context
def fsck(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Prove every object, commit row, ref and working-model shard against the hashes.

    Rows no hash covers (metrics, probe outputs) are counted as unproved. Exit status 1 when
    anything is damaged (after --repair: when anything is left that it cannot repair).

    \b
    Example:
        kedit fsck
        kedit fsck --repair
    """
    from kedit.core.maintenance import fsck as run_fsck
    from kedit.core.maintenance import repair as run_repair

    repo = _open(ctx)
    report = (run_repair if repair else run_fsck)(repo, progress=progress_enabled())
    if as_json:
        _emit_json(report.summary())
    else:
        for line in report.repaired:
            click.echo(f"repaired: {line}")
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        for e in report.errors:
            click.echo(f"error: {e}")
        if report.unproved:
            click.echo("unproved (no hash covers them): "
                       + ", ".join(f"{n} {what}" for what, n in report.unproved.items()))
        click.echo(f"checked {report.objects} objects, {report.commits} commits, {report.tensors} tensor changes, "
                   f"{report.worktree_shards} working-model shards: "
                   + ("ok" if report.ok else f"{len(report.errors)} problem(s)"))
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.option("--prune", default="14d", show_default=True,
              help="Remove unreachable objects older than this (now, 12h, 14d).")
@click.option("--reflog-expire", default="90d", show_default=True, help="Forget reflog entries older than this.")
@json_option
@click.pass_context
def gc(ctx: click.Context, prune: str, reflog_expire: str, as_json: bool) -> None:
    """Remove commits and objects that no ref or recent reflog entry reaches."""
    from kedit.core.maintenance import gc as run_gc

    repo = _open(ctx)
    report = run_gc(repo, grace=parse_age(prune), reflog_expiry=parse_age(reflog_expire))
    if as_json:
        _emit_json(report.__dict__)
    else:
        click.echo(f"removed {report.commits_removed} commits, {report.objects_removed} objects, "
                   f"{report.keyframes_removed} keyframes; freed {human_bytes(report.bytes_freed)}")


def main() -> None:
    try:
        try:
            cli(prog_name="kedit")
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is seen
    except BrokenPipeError:
        exit_closed_pipe()


import kedit.cli.config, kedit.cli.edit, kedit.cli.editors, kedit.cli.hub  # noqa: E402, E401, F401, I001

if __name__ == "__main__":
    main()
