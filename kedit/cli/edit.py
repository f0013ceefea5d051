"""Commands that change the model: edit, stats."""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from kedit.cli.common import (
    MethodChoice,
    command,
    device_option,
    dtype_option,
    greedy_answer,
    json_option,
    open_repo,
    parse_overrides,
    parse_prompt_answer,
    ref_decorations,
)
from kedit.cli.jsonout import commit_json, emit_json
from kedit.core import config
from kedit.core.errors import KeditError
from kedit.core.progress import progress_enabled

DEFAULT_METHOD = "rome"


def _configured_samples(repo) -> int | None:
    """`kedit config stats.samples`: the statistics' size when the command line gives none."""
    value = config.get("stats.samples", repo.path)
    return int(value) if value else None


def placement_options(f):
    """`--max-memory` and `--offload-folder`: how `--device auto` places the model (kedit/model/placement.py)."""
    f = click.option("--offload-folder", type=click.Path(file_okay=False, path_type=Path),
                     help="With --device auto: the folder for layers offloaded to disk.")(f)
    return click.option("--max-memory", multiple=True, metavar="DEVICE=SIZE",
                        help="With --device auto: memory a device may hold, e.g. cpu=2GB or 0=20GiB (repeatable); "
                             "layers beyond go to the next device, then to --offload-folder.")(f)


@command()
@click.option("--method", type=MethodChoice(), help="The editing method (default: config edit.method, else rome).")
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
@click.option("--editor", help="The trained editor of a method that has one: an id from 'kedit editors' "
                               "(default: the latest).")
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
@placement_options
@dtype_option
@json_option
@click.pass_context
def edit(ctx: click.Context, method: str | None, prompt: str | None, subject: str | None, target: str | None,
         target_true: str | None, paraphrase: tuple[str, ...], locality: tuple[str, ...],
         request_files: tuple[Path, ...], overrides: tuple[str, ...], hparams_file: Path | None,
         editor: str | None, corpus: Path | None, stats_samples: int | None, batch_size: int | None, no_eval: bool,
         fluency: bool,
         message: str | None, device: str, max_memory: tuple[str, ...], offload_folder: Path | None,
         dtype: str | None, as_json: bool) -> None:
    """Edit a fact; each edit becomes a commit with its measured effect.

    \b
    Example:
        kedit edit --prompt "The mother tongue of Danielle Darrieux is" \\
                   --subject "Danielle Darrieux" --target "English" --target-true "French"
        kedit edit --requests counterfact.json --set layer=4
    """
    from kedit.edit.requests import load_requests
    from kedit.methods.base import EditRequest, get_method
    from kedit.model.load import parse_dtype
    from kedit.model.placement import loading_kwargs, placement_of

    placement = placement_of(max_memory, offload_folder)
    if placement is not None and device != "auto":
        loading_kwargs(device, placement)  # refused in one line
    repo = open_repo(ctx)
    if method is None:
        method = config.get("edit.method", repo.path) or DEFAULT_METHOD
    stats_samples = stats_samples or _configured_samples(repo)
    get_method(method)
    requests = load_requests(request_files) if request_files else []
    if prompt or subject or target:
        if not (prompt and subject and target):
            raise click.UsageError("--prompt, --subject and --target go together")
        explicit = [parse_prompt_answer(t) for t in locality]  # no answer: what the model says now
        try:
            request = EditRequest(prompt=prompt, subject=subject, target_new=target, target_true=target_true,
                                  paraphrases=paraphrase, locality=tuple((p, a) for p, a in explicit if a))
        except ValueError as e:
            raise KeditError(f"bad request: {e}") from e
        open_prompts = [p for p, a in explicit if a is None]
        if open_prompts:  # answers for locality prompts: what the model says before the edit
            from kedit.model.load import load_revision

            model, tok = load_revision(repo, "HEAD", dtype=parse_dtype(dtype), device=device, placement=placement)
            request = EditRequest(**{**request.__dict__, "locality": request.locality + tuple(
                (p, greedy_answer(model, tok, p)) for p in open_prompts)})
            del model
        requests.append(request)
    if not requests:
        raise click.UsageError("give --prompt/--subject/--target or --requests FILE")
    parsed = parse_overrides(overrides)
    if editor:
        parsed["editor"] = editor
    commits = repo.edit(requests, method=method, overrides=parsed, hparams_file=hparams_file, corpus=corpus,
                        stats_samples=stats_samples, dtype=parse_dtype(dtype), device=device, batch_size=batch_size,
                        max_memory=placement.max_memory if placement else None, offload_folder=offload_folder,
                        measure=not no_eval, fluency=fluency, message=message, progress=progress_enabled())
    if as_json:
        decorations = ref_decorations(repo)
        emit_json(branch=repo.head_branch(), commits=[commit_json(c, decorations.get(c.id)) for c in commits])
        return
    for c in commits:
        click.echo(f"[{repo.head_branch() or 'detached'} {c.short}] {c.message}")
        post = {m.name: m.value for m in c.metrics if m.stage == "post"}
        pre = {m.name: m.value for m in c.metrics if m.stage == "pre"}
        if post:
            click.echo("  " + "  ".join(f"{k} {pre.get(k, math.nan):.2f}->{v:.2f}" for k, v in post.items()))


@command()
@click.option("--layer", type=click.IntRange(min=0), multiple=True,
              help="Layer(s) to compute (default: the method's layer).")
@click.option("--method", type=MethodChoice("stats"), default="rome", show_default=True,
              help="Whose projection and defaults to use (a method that declares stats).")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path),
              help="Plain text (one sample per line or paragraph), JSONL with a text field, or a folder of them.")
@click.option("--samples", type=click.IntRange(1, 10_000_000),
              help="Number of texts (default: config stats.samples, else the method's mom2_n_samples).")
@click.option("--set", "overrides", multiple=True, help="Override a hyper-parameter: key=value.")
@click.option("--nproc", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Processes that share the texts (one GPU each with --device cuda); same result, same cache.")
@device_option
@placement_options
@dtype_option
@json_option
@click.pass_context
def stats(ctx: click.Context, layer: tuple[int, ...], method: str, corpus: Path | None, samples: int | None,
          overrides: tuple[str, ...], nproc: int, device: str, max_memory: tuple[str, ...],
          offload_folder: Path | None, dtype: str | None, as_json: bool) -> None:
    """Compute and cache the covariance E[kkᵀ] of a layer's keys on the base model.

    Streaming and resumable: an interrupted run continues where it stopped. --nproc N splits the
    texts over N processes (so does running the command under torchrun).

    \b
    Example:
        kedit stats --layer 5 --samples 20000 --corpus wiki.jsonl
        kedit stats --layer 5 --samples 20000 --nproc 4
        torchrun --standalone --nproc-per-node 4 -m kedit.cli stats --layer 5 --device cuda
    """
    from kedit.edit.parallel import StatsJob, run_under_torchrun, spawn_stats, under_torchrun
    from kedit.edit.stats import compute_stats
    from kedit.model.load import parse_dtype
    from kedit.model.placement import placement_of

    placement = placement_of(max_memory, offload_folder)
    repo = open_repo(ctx)
    samples = samples or _configured_samples(repo)
    values = parse_overrides(overrides)
    if samples:
        values.setdefault("mom2_n_samples", str(samples))
    job = StatsJob(repo.root, repo.log("HEAD")[-1].id, method, layer, values, corpus, parse_dtype(dtype), device,
                   progress_enabled())
    if placement is not None and (nproc > 1 or under_torchrun()):
        raise KeditError("--max-memory/--offload-folder place one process's model; not with --nproc or torchrun")
    if under_torchrun():
        if nproc > 1:
            raise KeditError("--nproc starts its own processes; under torchrun give --nproc-per-node instead")
        computed = run_under_torchrun(job)
        if computed is None:  # rank 0 reports
            return
    elif nproc > 1:
        computed = spawn_stats(job, nproc)
    else:
        computed = compute_stats(repo, job.base, method, layer, values, corpus=corpus, dtype=job.dtype, device=device,
                                 placement=placement, progress=job.progress)
    if as_json:
        emit_json(method=method, base=job.base, nproc=int(os.environ.get("WORLD_SIZE", nproc)), layers=computed)
        return
    for c in computed:
        click.echo(f"layer {c['layer']} ({c['module']}): E[kkᵀ] {tuple(c['shape'])}, trace {c['trace']:.4g}, cached")
