"""Commands that read the history: log, show, status, reflog, diff (--behaviour: kedit/cli/behaviour.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kedit.cli.behaviour import behaviour_diff_command, tokens_option
from kedit.cli.common import (
    MAX_COUNT,
    command,
    device_option,
    dtype_option,
    human_bytes,
    json_option,
    open_repo,
    ref_decorations,
    say,
)
from kedit.cli.jsonout import commit_json, emit_json
from kedit.core.errors import KeditError
from kedit.core.refs import short_id

# -- log, show, status -------------------------------------------------------------------------

SHORT_METRICS = {"reliability": "rel", "generalization": "gen", "locality": "loc", "portability": "port",
                 "efficacy": "eff", "paraphrase": "para", "neighbourhood": "nbhd", "fluency": "flu",
                 "gen_efficacy": "geff", "gen_paraphrase": "gpara", "gen_locality": "gloc"}


def _echo_per_request(metrics: list) -> None:
    """A batch commit's per-request scores, one line per request (all of them in --json)."""
    by_request: dict[int, list] = {}
    for m in metrics:
        by_request.setdefault(m.request, []).append(m)
    for i in sorted(by_request)[:50]:
        click.echo(f"  {f'request {i}':<10} " + " ".join(f"{m.name}={m.value:.2f}" for m in by_request[i]))
    if len(by_request) > 50:
        click.echo(f"  ... {len(by_request) - 50} more requests (kedit show --json)")


def _metric_summary(commit) -> str:
    parts = []
    for m in commit.metrics:
        if m.stage in ("post", "eval") and m.name in SHORT_METRICS and m.request is None:
            parts.append(f"{SHORT_METRICS[m.name]}={m.value:.2f}")
    return " ".join(dict.fromkeys(parts))


def _oneline(commit, decorations: dict[str, list[str]]) -> str:
    deco = decorations.get(commit.id)
    deco_text = click.style(f" ({', '.join(deco)})", fg="yellow") if deco else ""
    metrics = _metric_summary(commit)
    kind = commit.method or commit.kind
    return (f"{click.style(commit.short, fg='yellow')}{deco_text} [{kind}] {commit.message}"
            + (f"  {click.style(metrics, fg='cyan')}" if metrics else ""))


@command()
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
@click.option("--plot", "plot_metric", metavar="METRIC", help="Draw METRIC along these commits into --out.")
@click.option("--out", "plot_out", type=click.Path(path_type=Path, dir_okay=False),
              help="The --plot file: .png, .svg, .pdf or .html.")
@json_option
@click.pass_context
def log(ctx: click.Context, revs: tuple[str, ...], oneline: bool, max_count: int | None, graph: bool,
        grep: str | None, author: str | None, since: str | None, until: str | None, subject: str | None,
        method: str | None, plot_metric: str | None, plot_out: Path | None, as_json: bool) -> None:
    """Show the edit history from REVS (default HEAD), newest first, with metrics.

    REVS are revisions (their histories together), ranges A..B (in B, not in A) and A...B
    (in one of them only), or ^A (not in A's history).

    \b
    Example:
        kedit log --oneline -n 10
        kedit log main..experiment
        kedit log --subject "Eiffel Tower" --method rome
        kedit log --graph
        kedit log --plot gen_efficacy --out trend.png
    """
    from kedit.core.revisions import CommitFilter, filtered, parse_when, select

    repo = open_repo(ctx)
    keep = CommitFilter(grep, author, parse_when(since) if since else None, parse_when(until) if until else None,
                       subject, method)
    if (plot_metric is None) != (plot_out is None):
        raise KeditError("--plot METRIC and --out FILE go together")
    if graph and plot_metric:
        raise KeditError("--plot draws one history, not --graph's branches: name the revisions instead")
    if graph and (revs or keep != CommitFilter()):
        raise KeditError("--graph draws every branch: it takes no revisions or filters")
    if graph:
        from kedit.core.graph import render_graph

        commits = render_graph(repo, max_count)
        decorations = ref_decorations(repo)
        if as_json:  # the commits with their lane prefix; the joining lines carry no commit
            emit_json(commits=[{**commit_json(c, decorations.get(c.id)), "graph": prefix.rstrip()}
                               for prefix, c in commits if c is not None])
            return
        for prefix, commit in commits:
            click.echo(prefix + (_oneline(commit, decorations) if commit else ""))
        return
    ids = filtered(repo.db, select(repo.db, repo.refs, revs or ["HEAD"]), keep, max_count)
    commits = [repo.get_commit(c) for c in ids]
    decorations = ref_decorations(repo)
    if plot_metric and plot_out:
        from kedit.ui.plot import plot_metric as draw
        from kedit.ui.views import trend_of

        drawn = draw(trend_of(commits[::-1]), plot_metric, plot_out)
        say(ctx, f"wrote {drawn.path}: {drawn.metric} at {drawn.points} of {drawn.commits} commits")
        if not as_json:
            return
    if as_json:
        emit_json(commits=[commit_json(c, decorations.get(c.id)) for c in commits])
        return
    for commit in commits:
        if oneline:
            click.echo(_oneline(commit, decorations))
            continue
        deco = decorations.get(commit.id)
        click.echo(click.style(f"commit {commit.id}", fg="yellow") + (f" ({', '.join(deco)})" if deco else ""))
        if len(commit.parents) > 1:
            click.echo("Merge:  " + " ".join(short_id(p) for p in commit.parents))
        click.echo(f"Author: {commit.author}")
        click.echo(f"Date:   {commit.created}")
        if commit.method:
            click.echo(f"Method: {commit.method}")
        click.echo(f"\n    {commit.message}\n")
        if commit.metrics:
            click.echo("    " + "  ".join(f"{m.name}[{m.stage}]={m.value:.3f}" for m in commit.metrics) + "\n")


@command()
@click.argument("rev", default="HEAD")
@json_option
@click.pass_context
def show(ctx: click.Context, rev: str, as_json: bool) -> None:
    """Show one commit: its request, method, hyper-parameters, metrics and per-tensor delta.

    \b
    Example:
        kedit show HEAD~2
    """
    repo = open_repo(ctx)
    commit = repo.get_commit(repo.resolve(rev))
    changes = repo.changes(commit.id)
    adapters = repo.adapter_ops(commit.id)
    if as_json:
        tensors = [{"name": c.name, "encoding": c.encoding, "rank": c.rank, "dtype": c.dtype,
                    "shape": list(c.shape), "delta_norm": c.delta_norm, "rel_change": c.rel_change,
                    "stored_bytes": c.stored_bytes, "hash": c.result_hash,
                    "steps": [s.__dict__ for s in c.steps]} for c in changes]
        emit_json(commit=commit_json(commit, ref_decorations(repo).get(commit.id)), tensors=tensors,
                  adapters=[{"op": op, "object": oid, "kind": kind, "config": _adapter_config(repo, oid)}
                            for op, oid, kind in adapters])
        return
    click.echo(click.style(f"commit {commit.id}", fg="yellow"))
    if len(commit.parents) > 1:  # a merge: its first parent, then the merged side
        click.echo("Parents: " + " ".join(commit.parents))
    else:
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
        per_request = [m for m in commit.metrics if m.request is not None]
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
        count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
        click.echo(f"Adapter {op}: {kind} {short_id(oid)} ({count}{where})")
        for entry in entries:  # adapters may list what they hold, for people (GRACE: one per edit)
            head = f"{entry['prompt']!r} -> {entry['target']!r}  " if "prompt" in entry and "target" in entry else ""
            rest = "  ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in entry.items()
                             if k not in ("prompt", "target"))
            click.echo(f"  {head}{rest}")


def _adapter_config(repo: Any, object_id: str) -> dict:
    """An adapter object's JSON config (its tensors are not read by the engine)."""
    return json.loads(repo.store.get_metadata(object_id).get("config", "{}"))


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the current branch and whether the working model matches HEAD."""
    repo = open_repo(ctx)
    info = repo.status()
    if as_json:
        emit_json(**info)
        return
    where = f"On branch {info['branch']}" if info["branch"] else f"HEAD detached at {short_id(info['head'])}"
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




@command()
@click.argument("ref", default="HEAD")
@click.option("-n", "--max-count", type=click.IntRange(0, MAX_COUNT), help="Show at most N entries.")
@json_option
@click.pass_context
def reflog(ctx: click.Context, ref: str, max_count: int | None, as_json: bool) -> None:
    """Show where REF (default HEAD) has pointed, newest first; each entry's name (HEAD@{1})
    is a revision."""
    repo = open_repo(ctx)
    entries = repo.reflog(ref, limit=max_count)
    if as_json:
        emit_json(ref=ref, entries=entries)
        return
    for i, e in enumerate(entries):
        click.echo(f"{short_id(e['new'] or '-')} {ref}@{{{i}}}: {e['message']}")




@command()
@click.argument("rev_a")
@click.argument("rev_b", required=False)
@click.option("--stat", is_flag=True, help="Only the names of differing tensors.")
@click.option("--quiet", "quiet_diff", is_flag=True, help="No output; the exit status says it all.")
@click.option("--behaviour", is_flag=True,
              help="Compare what the models say (greedy continuations, answer probabilities, KL), not weights.")
@click.option("--suite", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --behaviour: the prompts of this request file (default: the probe suite).")
@click.option("--prompt", "prompts", multiple=True, metavar="'PROMPT[=>ANSWER]'",
              help="With --behaviour: compare this prompt (repeatable).")
@click.option("--reference", type=click.Path(exists=True, path_type=Path),
              help="With --behaviour: text for the KL divergence (default: text the base model writes).")
@click.option("--reference-texts", type=click.IntRange(0, 1000), default=4, show_default=True,
              help="With --behaviour: how many reference texts (0: no KL).")
@tokens_option
@device_option
@dtype_option
@json_option
@click.pass_context
def diff(ctx: click.Context, rev_a: str, rev_b: str | None, stat: bool, quiet_diff: bool, behaviour: bool,
         suite: Path | None, prompts: tuple[str, ...], reference: Path | None, reference_texts: int, tokens: int,
         device: str, dtype: str | None, as_json: bool) -> None:
    """Per-tensor weight differences between REV_A and REV_B (default HEAD); with --behaviour,
    what the two models say differently.

    REV_A may instead be a range: A..B compares A with B, A...B compares B with the commit
    where A and B diverged (their merge base).

    Exit status: 0 when the models are equal (--behaviour: no continuation changed), 1 when
    they differ, 2 on error.

    \b
    Example:
        kedit diff HEAD~1 HEAD
        kedit diff main experiment --json
        kedit diff main...experiment
        kedit diff --behaviour HEAD~1 HEAD --prompt "The Eiffel Tower is in=>Paris"
    """
    from kedit.core.diff import adapter_diff
    from kedit.core.diff import diff as compute_diff
    from kedit.core.revisions import diff_endpoints

    ctx.obj["exit_code"] = 2  # 1 means "the models differ"
    repo = open_repo(ctx)
    rev_a, rev_b = diff_endpoints(repo.refs, repo.db, rev_a, rev_b)
    if behaviour:
        changed = behaviour_diff_command(ctx, rev_a, rev_b, suite=suite, prompts=prompts, reference=reference,
                                         reference_texts=reference_texts, tokens=tokens, device=device, dtype=dtype,
                                         as_json=as_json)
        sys.exit(1 if changed else 0)
    diffs = compute_diff(repo, rev_a, rev_b)
    adapters = adapter_diff(repo, rev_a, rev_b)
    differ = bool(diffs or adapters["added"] or adapters["removed"])
    if as_json:
        emit_json(equal=not differ, tensors=[d.to_dict() for d in diffs], adapters=adapters)
    elif not quiet_diff:
        for d in diffs:
            if stat or d.status != "modified" or d.delta_norm is None:
                click.echo(f"{d.status:<9} {d.name}")
                continue
            click.echo(f"modified  {d.name:<44} |delta|={d.delta_norm:.4g} max={d.max_abs:.3g} "
                       f"rel={_num(d.rel_change)} changed={d.changed}/{d.numel}")
        for oid in adapters["added"]:
            click.echo(f"adapter+  {short_id(oid)}")
        for oid in adapters["removed"]:
            click.echo(f"adapter-  {short_id(oid)}")
        if not differ:
            say(ctx, "no differences")
    sys.exit(1 if differ else 0)
