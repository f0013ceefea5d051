"""Commands that ask what the model says differently and which commit did it: diff --behaviour
(called from `kedit diff`), blame, bisect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kedit.cli.common import (
    command,
    device_option,
    dtype_option,
    json_option,
    open_repo,
    parse_prompt_answer,
    ref_decorations,
    say,
)
from kedit.cli.jsonout import commit_json, emit_json
from kedit.core.refs import short_id

tokens_option = click.option("--tokens", type=click.IntRange(1, 512), default=10, show_default=True,
                             help="Greedy tokens generated after each prompt.")


def revision_loader(repo: Any, dtype: str | None, device: str) -> Any:
    """commit id -> (model, tokenizer), loading one revision at a time."""
    from kedit.model.load import load_revision, parse_dtype

    torch_dtype = parse_dtype(dtype)
    return lambda commit: load_revision(repo, commit, dtype=torch_dtype, device=device)


def behaviour_diff_command(ctx: click.Context, rev_a: str, rev_b: str, *, suite: Path | None,
                           prompts: tuple[str, ...], reference: Path | None, reference_texts: int, tokens: int,
                           device: str, dtype: str | None, as_json: bool) -> bool:
    """`kedit diff --behaviour`: prints the comparison; True when some continuation changed."""
    from kedit.eval.behaviour import compare, watched_prompts

    repo = open_repo(ctx)
    result = compare(repo, revision_loader(repo, dtype, device), rev_a, rev_b, watched_prompts(repo, suite, prompts),
                     reference=reference, n_reference=reference_texts, n_tokens=tokens)
    if as_json:
        emit_json(a=result.a, b=result.b, prompts=[p.to_dict() for p in result.prompts], kl=result.kl,
                  kl_tokens=result.kl_tokens, summary=result.summary())
        return bool(result.changed)
    for p in result.prompts:
        if not p.changed and not p.shift:
            continue
        click.echo(click.style(repr(p.prompt), bold=True) + (f"  (answer {p.answer!r})" if p.answer else ""))
        if p.changed:
            click.echo(click.style(f"-{p.before}", fg="red"))
            click.echo(click.style(f"+{p.after}", fg="green"))
        if p.answer and p.p_before is not None and p.p_after is not None:
            flip = "  FLIPPED" if p.flipped else ""
            click.echo(f"  P({p.answer}) {p.p_before:.3f} -> {p.p_after:.3f}{flip}")
    s = result.summary()
    kl = f"; KL {s['kl']:.4g} nats/token over {result.kl_tokens} reference tokens" if s["kl"] is not None else ""
    click.echo(f"{s['changed']} of {s['prompts']} continuations changed, {s['flipped']} answers flipped{kl}")
    return bool(result.changed)


@command()
@click.argument("prompt")
@click.argument("rev", default="HEAD")
@tokens_option
@device_option
@dtype_option
@json_option
@click.pass_context
def blame(ctx: click.Context, prompt: str, rev: str, tokens: int, device: str, dtype: str | None,
          as_json: bool) -> None:
    """The commits after which the model's continuation of PROMPT changed, newest first.

    Commits whose requests name a subject in PROMPT are looked at first; the rest of the
    history is searched by halving, so few revisions are materialised.

    \b
    Example:
        kedit blame "The Eiffel Tower is located in the city of"
    """
    from kedit.eval.behaviour import blame as run_blame

    repo = open_repo(ctx)
    found = run_blame(repo, revision_loader(repo, dtype, device), prompt, rev, n_tokens=tokens)
    decorations = ref_decorations(repo)
    if as_json:
        emit_json(prompt=prompt, entries=[{"commit": commit_json(repo.get_commit(e.commit), decorations.get(e.commit)),
                                           "before": e.before, "after": e.after, "names_subject": e.names_subject}
                                          for e in found.entries],
                  materialised=found.materialised, commits=found.commits)
        return
    for e in found.entries:
        c = repo.get_commit(e.commit)
        named = "  (its request names the subject)" if e.names_subject else ""
        click.echo(click.style(c.short, fg="yellow") + f" {c.message}{named}")
        click.echo(click.style(f"  -{e.before}", fg="red"))
        click.echo(click.style(f"  +{e.after}", fg="green"))
    if not found.entries:
        say(ctx, "no commit on this history changed the continuation")
    say(ctx, f"materialised {found.materialised} of {found.commits} revisions")


@command()
@click.option("--good", required=True, metavar="REV", help="A revision that behaves well.")
@click.option("--bad", default="HEAD", show_default=True, metavar="REV", help="A later revision that does not.")
@click.option("--probe", "probe", metavar="'PROMPT=>ANSWER'",
              help="Bad when the greedy continuation of PROMPT no longer shows ANSWER.")
@click.option("--metric", metavar="NAME", help="Bad when this metric on --suite falls more than --drop below --good's.")
@click.option("--drop", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--suite", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fixed request file --metric is measured on.")
@click.option("--run", "run_command", metavar="CMD",
              help="Bad when this shell command exits 1-127 on the revision exported to $KEDIT_BISECT_MODEL.")
@tokens_option
@device_option
@dtype_option
@json_option
@click.pass_context
def bisect(ctx: click.Context, good: str, bad: str, probe: str | None, metric: str | None, drop: float,
           suite: Path | None, run_command: str | None, tokens: int, device: str, dtype: str | None,
           as_json: bool) -> None:
    """Find the first commit between --good and --bad where a probe, a metric or a command goes bad.

    Follows first parents; tries about log2(n) of the n commits in between.

    \b
    Example:
        kedit bisect --good v1.0 --probe "The capital of Spain is=>Madrid"
        kedit bisect --good HEAD~64 --metric neighbourhood --drop 0.05 --suite facts.json
        kedit bisect --good v1.0 --run 'python my_eval.py "$KEDIT_BISECT_MODEL"'
    """
    from kedit.eval import bisect as b

    if sum(x is not None for x in (probe, metric, run_command)) != 1:
        raise click.UsageError("give exactly one of --probe, --metric or --run")
    repo = open_repo(ctx)
    load = revision_loader(repo, dtype, device)
    if probe is not None:
        prompt, answer = parse_prompt_answer(probe)
        if not answer:
            raise click.BadParameter("write it as 'PROMPT=>ANSWER'", param_hint="--probe")
        is_bad = b.probe_test(load, prompt, answer, tokens)
    elif metric is not None:
        if suite is None:
            raise click.UsageError("--metric needs --suite FILE: the fixed requests it is measured on")
        from kedit.edit.requests import load_requests

        is_bad = b.metric_test(load, load_requests([suite]), metric, drop, repo.resolve(good))
    else:
        is_bad = b.command_test(repo, run_command or "")
    result = b.bisect(repo, good, bad, is_bad)
    first = repo.get_commit(result.first_bad)
    if as_json:
        emit_json(first_bad=commit_json(first, ref_decorations(repo).get(first.id)),
                  tested=[{"commit": c, "bad": v} for c, v in result.tested], steps=result.steps)
        return
    for c, verdict in result.tested:
        say(ctx, f"{'bad ' if verdict else 'good'} {short_id(c)}")
    click.echo(f"first bad commit: {first.short} {first.message}")
    for r in first.requests:
        click.echo(f"  request: {r.get('prompt', '')!r} -> {r.get('target_new', '')!r}")
    say(ctx, f"tested {len(result.tested)} revisions for {result.steps} commits")
