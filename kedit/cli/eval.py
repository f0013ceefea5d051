"""Commands that measure: eval, check, probe add/list/rm."""

from __future__ import annotations

from pathlib import Path

import click

from kedit.cli.common import (
    chat_option,
    command,
    device_option,
    dtype_option,
    greedy_answer,
    group,
    json_option,
    open_repo,
    say,
)
from kedit.cli.jsonout import emit_json
from kedit.core.refs import short_id


@command(name="eval")
@click.argument("rev", default="HEAD")
@click.option("--suite", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Requests to score (any request format); default: the edits in effect at REV.")
@click.option("--fluency", is_flag=True, help="Also measure fluency.")
@chat_option
@device_option
@dtype_option
@click.option("--quant", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]),
              help="Measure the model as a GGUF file of this type runs it (quantised and dequantised with gguf).")
@json_option
@click.pass_context
def eval_(ctx: click.Context, rev: str, suite: Path | None, fluency: bool, chat: bool, device: str,
          dtype: str | None, quant: str | None, as_json: bool) -> None:
    """Measure REV: reliability, generalization, locality, portability, CounterFact scores.

    Locality compares with the base model's outputs. Results are stored with the commit and
    shown by log and show. --chat measures instead what a chat user reads in the reply:
    chat_gen_efficacy, chat_gen_paraphrase, chat_gen_locality.

    \b
    Example:
        kedit eval HEAD --suite probes.json --json
        kedit eval HEAD --chat
        kedit eval HEAD --quant q4_1     # do the edits survive a Q4_1 GGUF?
    """
    from kedit.model.load import parse_dtype

    repo = open_repo(ctx)
    metrics = repo.eval(rev, suite=suite, fluency=fluency, chat=chat, dtype=parse_dtype(dtype), device=device,
                        quant=quant)
    if as_json:
        emit_json(commit=repo.resolve(rev), metrics=[m.__dict__ for m in metrics])
        return
    for m in metrics:
        click.echo(f"{m.name:<16} {m.value:8.4f}  ({m.protocol})")


@command()
@click.argument("rev", default="HEAD")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="A probe breaks when its score falls more than this below the parent's or the reference's.")
@click.option("--protocol", type=click.Choice(["teacher-forced", "generation"]), default="teacher-forced",
              show_default=True, help="Score probes by teacher-forced argmax, or by 10-token greedy generation "
              "(a fact shows in it; a locality probe still holds its answer or the base's continuation).")
@click.option("--against", metavar="REV",
              help="Also hold every probe against this earlier revision (default: the base).")
@chat_option
@device_option
@dtype_option
@click.option("--quant", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]),
              help="Measure the model as a GGUF file of this type runs it (quantised and dequantised with gguf).")
@json_option
@click.pass_context
def check(ctx: click.Context, rev: str, threshold: float, protocol: str, against: str | None, chat: bool,
          device: str, dtype: str | None, quant: str | None, as_json: bool) -> None:
    """Re-run the probe suite at REV against its parent and the base; exit 1 if anything broke.

    A probe also breaks when it drifted below its score at the base (or --against REV) over many
    commits; each broken probe names the commit where it first fell. Run it in CI after every edit.

    \b
    Example:
        kedit check && echo "no regressions"
        kedit check --protocol generation    # what users reading the model's output see
        kedit check --against v1.0 --json
        kedit check --chat
    """
    from kedit.model.load import parse_dtype

    report = open_repo(ctx).check(rev, threshold=threshold, protocol=protocol, against=against, chat=chat,
                                  dtype=parse_dtype(dtype), device=device, quant=quant)
    if as_json:
        emit_json(commit=report.commit_id, against=report.against, protocol=report.protocol,
                  prompts=report.prompts, ok=not report.broken, summary=report.summary(),
                  results=[{"probe": r.probe.__dict__, "base": r.base, "parent": r.parent, "now": r.now,
                            "against": r.against, "broke": r.broke, "first_broke": r.first_broke,
                            "edited_by": r.edited_by} for r in report.results])
    else:
        if not report.results:
            say(ctx, "the probe suite is empty (kedit edit adds probes; or kedit probe add)")
        by_edits = {r.probe.id: r.edited_by for r in report.changed_by_edits}
        for r in report.results:
            mark = click.style("BROKE", fg="red") if r.broke else "EDIT " if r.probe.id in by_edits else "ok   "
            parent = "-" if r.parent is None else f"{r.parent:.2f}"
            named = f"  (names the subject of {short_id(by_edits[r.probe.id])})" if r.probe.id in by_edits else ""
            first = f"  (first broke at {short_id(r.first_broke)}, held {r.against:.2f})" if r.first_broke else ""
            click.echo(f"{mark} {r.probe.kind:<8} #{r.probe.id:<4} {parent}->{r.now:.2f}  "
                       f"{r.probe.prompt!r} -> {r.probe.answer!r}{named}{first}")
        summary = ", ".join(f"{k} {v:.3f}" for k, v in report.summary().items())
        click.echo(("chat template: " if chat else "") + f"{len(report.broken)} broken of {len(report.results)} probes"
                   f" [{protocol}]"
                   + (f" ({summary})" if summary else "")
                   + (f"; {len(by_edits)} locality probes changed with an edit of their own subject, not counted"
                      if by_edits else ""))
    if report.broken:
        raise SystemExit(1)


@group()
def probe() -> None:
    """Manage the probe suite that kedit check runs."""


@probe.command(name="add")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeatable).")
@click.option("--answer", "answers", multiple=True, help="Its answer (default: what the base model says now).")
@click.option("--kind", type=click.Choice(["locality", "edit"]), default="locality", show_default=True)
@json_option
@click.pass_context
def probe_add(ctx: click.Context, prompts: tuple[str, ...], answers: tuple[str, ...], kind: str,
              as_json: bool) -> None:
    """Add probes; a locality probe's answer defaults to the base model's own completion.

    \b
    Example:
        kedit probe add --prompt "The capital of Germany is" --answer Berlin
    """
    from kedit.eval.probes import add_probes

    repo = open_repo(ctx)
    if answers and len(answers) != len(prompts):
        raise click.UsageError("give one --answer per --prompt, or none")
    if not answers:
        from kedit.model.load import load_revision

        model, tok = load_revision(repo, repo.log("HEAD")[-1].id)
        answers = tuple(greedy_answer(model, tok, p) for p in prompts)
    added = add_probes(repo, [(kind, p, a, None) for p, a in zip(prompts, answers, strict=True)])
    if as_json:
        emit_json(probes=[p.__dict__ for p in added])
        return
    for p in added:
        click.echo(f"#{p.id} {p.kind}: {p.prompt!r} -> {p.answer!r}")


@probe.command(name="list")
@json_option
@click.pass_context
def probe_list(ctx: click.Context, as_json: bool) -> None:
    """List the probes."""
    from kedit.eval.probes import list_probes

    probes = list_probes(open_repo(ctx))
    if as_json:
        emit_json(probes=[p.__dict__ for p in probes])
        return
    for p in probes:
        origin = f" (edit {short_id(p.commit_id)})" if p.commit_id else ""
        click.echo(f"#{p.id:<4} {p.kind:<8} {p.prompt!r} -> {p.answer!r}{origin}")


@probe.command(name="rm")
@click.argument("probe_id", type=click.IntRange(1, 2**63 - 1))
@json_option
@click.pass_context
def probe_rm(ctx: click.Context, probe_id: int, as_json: bool) -> None:
    """Remove a probe by id."""
    from kedit.eval.probes import remove_probe

    remove_probe(open_repo(ctx), probe_id)
    if as_json:
        emit_json(removed=probe_id)
