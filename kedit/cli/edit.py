"""Commands that run models: edit, stats, eval, check, probe."""

from __future__ import annotations

import math
from pathlib import Path

import click

from kedit.cli import _emit_json, _open, _say, cli, json_option
from kedit.core import config
from kedit.core.errors import KeditError
from kedit.core.progress import progress_enabled


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
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


DEFAULT_METHOD = "rome"
device_option = click.option("--device", default="cpu", show_default=True, callback=_check_device,
                             help="cpu, cuda, cuda:N, or auto (spread a large model over GPUs and CPU).")
dtype_option = click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                            help="Compute dtype (default: as stored).")
chat_option = click.option("--chat", is_flag=True,
                           help="Send each prompt as a user message through the tokenizer's chat template "
                                "(its own scores and protocol, chat_template_*).")


def _configured_samples(repo) -> int | None:
    """`kedit config stats.samples`: the statistics' size when the command line gives none."""
    value = config.get("stats.samples", repo.path)
    return int(value) if value else None


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--set")
        out[key.strip()] = value.strip()
    return out


def _locality_arg(text: str) -> tuple[str, str | None]:
    """'PROMPT=>ANSWER', or just PROMPT (the answer is then what the model says now)."""
    prompt, sep, answer = text.partition("=>")
    return (prompt.strip(), answer.strip() if sep else None)


def _greedy_answer(model, tok, prompt: str, n_tokens: int = 4) -> str:
    from kedit.eval.metrics import greedy_continuations

    return greedy_continuations(model, tok, [prompt], n_tokens)[0].strip()


@cli.command()
@click.option("--method", help="The editing method (default: config edit.method, else rome).")
@click.option("--prompt", help="The prompt, holding the subject (or {} in its place).")
@click.option("--subject", help="The subject whose fact changes.")
@click.option("--target", help="The new completion.")
@click.option("--target-true", help="The current (true) completion, for CounterFact scores.")
@click.option("--paraphrase", multiple=True, help="A paraphrase of the prompt (repeatable).")
@click.option("--locality", multiple=True,
              help="An unrelated prompt that must not change, as PROMPT or PROMPT=>ANSWER.")
@click.option("--requests", "request_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Edit requests: kedit/EasyEdit JSON(L), CounterFact, zsRE (MEND format), KnowEdit.")
@click.option("--set", "overrides", multiple=True, help="Override a hyper-parameter: key=value (repeatable).")
@click.option("--hparams", "hparams_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Hyper-parameters from a YAML file (EasyEdit files work).")
@click.option("--editor", help="The trained editor (mend, instructedit): an id from 'kedit editors' (default: latest).")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path),
              help="Text for covariance statistics (file or folder); default: text the model generates.")
@click.option("--stats-samples", type=click.IntRange(1, 10_000_000),
              help="Texts behind the covariance statistics (default: config stats.samples, else the method's).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Requests per commit (default: 1, or all for batch methods).")
@click.option("--no-eval", is_flag=True, help="Skip the before/after measurements.")
@click.option("--fluency", is_flag=True, help="Also measure fluency (n-gram entropy of 100-token generations).")
@click.option("-m", "--message", help="Commit message (single request).")
@device_option
@dtype_option
@json_option
@click.pass_context
def edit(ctx: click.Context, method: str | None, prompt: str | None, subject: str | None, target: str | None,
         target_true: str | None, paraphrase: tuple[str, ...], locality: tuple[str, ...],
         request_files: tuple[Path, ...], overrides: tuple[str, ...], hparams_file: Path | None,
         editor: str | None, corpus: Path | None, stats_samples: int | None, batch_size: int | None, no_eval: bool,
         fluency: bool,
         message: str | None, device: str, dtype: str | None, as_json: bool) -> None:
    """Edit a fact; each edit becomes a commit with its measured effect.

    \b
    Example:
        kedit edit --prompt "The mother tongue of Danielle Darrieux is" \\
                   --subject "Danielle Darrieux" --target "English" --target-true "French"
        kedit edit --requests counterfact.json --set layer=4
    """
    from kedit.edit.requests import load_requests
    from kedit.edit.run import EditOptions, run_edits
    from kedit.methods.base import EditRequest, get_method
    from kedit.model.load import parse_dtype

    repo = _open(ctx)
    if method is None:
        method = config.get("edit.method", repo.path) or DEFAULT_METHOD
    stats_samples = stats_samples or _configured_samples(repo)
    get_method(method)
    requests = load_requests(request_files) if request_files else []
    if prompt or subject or target:
        if not (prompt and subject and target):
            raise click.UsageError("--prompt, --subject and --target go together")
        explicit = [_locality_arg(t) for t in locality]
        try:
            request = EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=target_true,
                                  paraphrases=paraphrase, locality=tuple((p, a) for p, a in explicit if a))
        except ValueError as e:
            raise KeditError(f"bad request: {e}") from e
        open_prompts = [p for p, a in explicit if a is None]
        if open_prompts:  # answers for locality prompts: what the model says before the edit
            from kedit.model.load import load_model

            model, tok = load_model(repo, "HEAD", dtype=parse_dtype(dtype), device=device)
            request = EditRequest(**{**request.__dict__, "locality": request.locality + tuple(
                (p, _greedy_answer(model, tok, p)) for p in open_prompts)})
            del model
        requests.append(request)
    if not requests:
        raise click.UsageError("give --prompt/--subject/--target or --requests FILE")
    parsed = _parse_overrides(overrides)
    if editor:
        parsed["editor"] = editor
    options = EditOptions(method=method, overrides=parsed, hparams_file=hparams_file,
                          corpus=corpus, stats_samples=stats_samples, dtype=parse_dtype(dtype), device=device,
                          batch_size=batch_size, measure=not no_eval, fluency=fluency, message=message,
                          progress=progress_enabled())
    commits = run_edits(repo, requests, options)
    if as_json:
        _emit_json([{"id": c.id, "message": c.message, "info": c.info,
                     "metrics": [m.__dict__ for m in c.metrics]} for c in commits])
        return
    for c in commits:
        click.echo(f"[{repo.head_branch() or 'detached'} {c.short}] {c.message}")
        post = {m.name: m.value for m in c.metrics if m.stage == "post"}
        pre = {m.name: m.value for m in c.metrics if m.stage == "pre"}
        if post:
            click.echo("  " + "  ".join(f"{k} {pre.get(k, math.nan):.2f}->{v:.2f}" for k, v in post.items()))


@cli.command()
@click.option("--layer", type=click.IntRange(min=0), multiple=True,
              help="Layer(s) to compute (default: the method's layer).")
@click.option("--method", default="rome", show_default=True, help="Whose projection and defaults to use.")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path),
              help="Plain text (one sample per line or paragraph), JSONL with a text field, or a folder of them.")
@click.option("--samples", type=click.IntRange(1, 10_000_000),
              help="Number of texts (default: config stats.samples, else the method's mom2_n_samples).")
@click.option("--set", "overrides", multiple=True, help="Override a hyper-parameter: key=value.")
@device_option
@dtype_option
@click.pass_context
def stats(ctx: click.Context, layer: tuple[int, ...], method: str, corpus: Path | None, samples: int | None,
          overrides: tuple[str, ...], device: str, dtype: str | None) -> None:
    """Compute and cache the covariance E[kkᵀ] of a layer's keys on the base model.

    Streaming and resumable: an interrupted run continues where it stopped.

    \b
    Example:
        kedit stats --layer 5 --samples 20000 --corpus wiki.jsonl
    """
    from kedit.edit.run import EditOptions, StatsProvider
    from kedit.methods.base import get_method
    from kedit.methods.hparams import hparams_from_overrides
    from kedit.model.load import load_model, parse_dtype

    repo = _open(ctx)
    samples = samples or _configured_samples(repo)
    base = repo.log("HEAD")[-1].id
    model, tok = load_model(repo, base, dtype=parse_dtype(dtype), device=device)
    values = _parse_overrides(overrides)
    if samples:
        values.setdefault("mom2_n_samples", str(samples))
    hp = hparams_from_overrides(get_method(method).hparams_cls, model, values)
    options = EditOptions(method=method, corpus=corpus, stats_samples=samples, device=device,
                          dtype=parse_dtype(dtype), progress=progress_enabled())
    provider = StatsProvider(repo, options, hp, (model, tok), base)
    from kedit.model.arch import arch_for, n_layers

    total = n_layers(model, arch_for(model))
    for lay in layer or (hp.layer,):
        if lay >= total:
            raise KeditError(f"--layer {lay} is past the model's last layer ({total} layers: 0..{total - 1})")
        module = arch_for(model).out_proj(lay)
        try:
            c = provider(module, lay)
        except ValueError as e:  # a corpus without texts, statistics that cannot be computed
            raise KeditError(f"statistics for layer {lay}: {e}") from e
        click.echo(f"layer {lay} ({module}): E[kkᵀ] {tuple(c.shape)}, trace {float(c.trace()):.4g}, cached")


@cli.command(name="eval")
@click.argument("rev", default="HEAD")
@click.option("--suite", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Requests to score (any request format); default: the edits in effect at REV.")
@click.option("--fluency", is_flag=True, help="Also measure fluency.")
@chat_option
@device_option
@dtype_option
@json_option
@click.pass_context
def eval_(ctx: click.Context, rev: str, suite: Path | None, fluency: bool, chat: bool, device: str,
          dtype: str | None, as_json: bool) -> None:
    """Measure REV: reliability, generalization, locality, portability, CounterFact scores.

    Locality compares with the base model's outputs. Results are stored with the commit and
    shown by log and show. --chat measures instead what a chat user reads in the reply:
    chat_gen_efficacy, chat_gen_paraphrase, chat_gen_locality.

    \b
    Example:
        kedit eval HEAD --suite probes.json --json
        kedit eval HEAD --chat
    """
    from kedit.eval.revision import evaluate_revision
    from kedit.model.load import parse_dtype

    repo = _open(ctx)
    metrics = evaluate_revision(repo, rev, suite=suite, fluency=fluency, dtype=parse_dtype(dtype), device=device,
                                chat=chat)
    if as_json:
        _emit_json([m.__dict__ for m in metrics])
        return
    for m in metrics:
        click.echo(f"{m.name:<16} {m.value:8.4f}  ({m.protocol})")


@cli.command()
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
@json_option
@click.pass_context
def check(ctx: click.Context, rev: str, threshold: float, protocol: str, against: str | None, chat: bool,
          device: str, dtype: str | None, as_json: bool) -> None:
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
    from kedit.eval.probes import check as run_check
    from kedit.model.load import load_model, parse_dtype

    repo = _open(ctx)
    torch_dtype = parse_dtype(dtype)
    report = run_check(repo, rev, lambda c: load_model(repo, c, dtype=torch_dtype, device=device),
                       threshold=threshold, setting=f"{device}/{dtype or 'auto'}", protocol=protocol,
                       against=against, chat=chat)
    if as_json:
        _emit_json({"commit": report.commit_id, "against": report.against, "protocol": report.protocol,
                    "prompts": report.prompts, "ok": not report.broken,
                    "summary": report.summary(),
                    "results": [{"probe": r.probe.__dict__, "base": r.base, "parent": r.parent, "now": r.now,
                                 "against": r.against, "broke": r.broke, "first_broke": r.first_broke,
                                 "edited_by": r.edited_by} for r in report.results]})
    else:
        if not report.results:
            _say(ctx, "the probe suite is empty (kedit edit adds probes; or kedit probe add)")
        by_edits = {r.probe.id: r.edited_by for r in report.changed_by_edits}
        for r in report.results:
            mark = click.style("BROKE", fg="red") if r.broke else "EDIT " if r.probe.id in by_edits else "ok   "
            parent = "-" if r.parent is None else f"{r.parent:.2f}"
            named = f"  (names the subject of {by_edits[r.probe.id][:12]})" if r.probe.id in by_edits else ""
            first = f"  (first broke at {r.first_broke[:12]}, held {r.against:.2f})" if r.first_broke else ""
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


@cli.group()
def probe() -> None:
    """Manage the probe suite that kedit check runs."""


@probe.command(name="add")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeatable).")
@click.option("--answer", "answers", multiple=True, help="Its answer (default: what the base model says now).")
@click.option("--kind", type=click.Choice(["locality", "edit"]), default="locality", show_default=True)
@click.pass_context
def probe_add(ctx: click.Context, prompts: tuple[str, ...], answers: tuple[str, ...], kind: str) -> None:
    """Add probes; a locality probe's answer defaults to the base model's own completion.

    \b
    Example:
        kedit probe add --prompt "The capital of Germany is" --answer Berlin
    """
    from kedit.eval.probes import add_probes

    repo = _open(ctx)
    if answers and len(answers) != len(prompts):
        raise click.UsageError("give one --answer per --prompt, or none")
    if not answers:
        from kedit.model.load import load_model

        model, tok = load_model(repo, repo.log("HEAD")[-1].id)
        answers = tuple(_greedy_answer(model, tok, p) for p in prompts)
    added = add_probes(repo, [(kind, p, a, None) for p, a in zip(prompts, answers, strict=True)])
    for p in added:
        click.echo(f"#{p.id} {p.kind}: {p.prompt!r} -> {p.answer!r}")


@probe.command(name="list")
@json_option
@click.pass_context
def probe_list(ctx: click.Context, as_json: bool) -> None:
    """List the probes."""
    from kedit.eval.probes import list_probes

    probes = list_probes(_open(ctx))
    if as_json:
        _emit_json([p.__dict__ for p in probes])
        return
    for p in probes:
        origin = f" (edit {p.commit_id[:12]})" if p.commit_id else ""
        click.echo(f"#{p.id:<4} {p.kind:<8} {p.prompt!r} -> {p.answer!r}{origin}")


@probe.command(name="rm")
@click.argument("probe_id", type=click.IntRange(1, 2**63 - 1))
@click.pass_context
def probe_rm(ctx: click.Context, probe_id: int) -> None:
    """Remove a probe by id."""
    from kedit.eval.probes import remove_probe

    remove_probe(_open(ctx), probe_id)
