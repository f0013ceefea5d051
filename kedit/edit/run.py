"""`kedit edit`: run a method on HEAD's model, commit its delta, measure the edit.

For each batch of requests (one request per commit for single-edit methods such as ROME):
  1. measure the model before the edit (reliability, generalization, locality reference, ...),
  2. ask the method for deltas (it never writes the repository),
  3. apply them (and install its adapters) in memory and check that each edit shows in greedy
     generation on its prompt as the user sends it (`shows_in_generation` in the commit's info),
  4. commit them (the engine applies them with its canonical arithmetic) onto the commit the model
     was loaded from (if HEAD moved meanwhile, nothing is committed), copy the committed tensors
     into the in-memory model and measure again,
  5. store both sets of metrics with the commit and add the edit to the probe suite.

Covariance statistics a method asks for (`kedit.edit.stats`) are computed on the base model and cached under
`.kedit/stats/`, keyed by the base commit, layer, corpus and sample count.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.core.delta import Adapter, apply_step
from kedit.core.errors import KeditError
from kedit.core.repo import CommitInfo, HeadState, Metric, Repository
from kedit.edit.stats import StatsProvider
from kedit.eval import metrics
from kedit.eval.measure import Reference, as_metrics, locality_pairs, measure, reference_of
from kedit.eval.probes import add_probes, subject_finder
from kedit.methods.base import EditRequest, Method, get_method
from kedit.methods.hparams import hparams_from_dict, hparams_from_overrides, hparams_to_dict
from kedit.model.adapters import install_adapters
from kedit.model.load import load_revision
from kedit.model.placement import Placement, read_weight, write_weight

log = logging.getLogger(__name__)


@dataclass
class EditOptions:
    method: str = "rome"
    overrides: dict[str, str] = field(default_factory=dict)
    hparams_file: Path | None = None
    corpus: Path | None = None  # text for covariance statistics; None: text the model generates
    stats_samples: int | None = None  # None: the method's hparams decide
    dtype: torch.dtype | None = None
    device: str = "cpu"
    placement: Placement | None = None  # with device "auto": memory per device, disk offload folder
    batch_size: int | None = None  # requests per commit; None: 1 for single-edit methods, all for batched
    measure: bool = True
    fluency: bool = False
    message: str | None = None
    progress: bool = False
    recorded_hparams: dict[str, Any] | None = None  # a commit's hyper-parameters, re-used as they were (replay)


def _apply_method(method: Method, model: Any, tok: Any, batch: list[EditRequest], hparams: Any,
                  stats: Callable[[str, int], torch.Tensor], repo: Repository) -> Any:
    """Call the method with what its declared capabilities ask for (kedit/core/plugins.py)."""
    kwargs: dict[str, Any] = {}
    if method.has("stats"):
        kwargs["stats_provider"] = stats
    if method.has("memory"):
        kwargs["memory"] = repo.memory(method.name)
    if method.has("editor"):
        from kedit.edit.trained import editor_loader

        kwargs["load_editor_fn"] = editor_loader(repo)
    try:
        return method.apply(model, tok, batch, hparams, **kwargs)
    except ValueError as e:  # methods report bad requests and hyper-parameters as ValueError
        raise KeditError(f"{method.name}: {e}") from e


def run_edits(repo: Repository, requests: list[EditRequest], options: EditOptions) -> list[CommitInfo]:
    """Edit the model at HEAD with `requests`, one commit per batch; returns the commits made."""
    method = get_method(options.method)
    repo.require_writable()  # before minutes of work that could not be committed
    if options.batch_size is not None and options.batch_size < 1:
        raise KeditError(f"the batch size must be at least 1, got {options.batch_size}")
    at = repo.head_state()  # each commit must land where the model was loaded (compare-and-swap)
    model, tok = load_revision(repo, at.commit, dtype=options.dtype, device=options.device,
                               placement=options.placement)
    overrides = dict(options.overrides)
    if options.stats_samples and method.has("stats"):
        overrides.setdefault("mom2_n_samples", str(options.stats_samples))  # record what C was built from
    try:
        hparams = hparams_from_overrides(method.hparams_cls, model, overrides, options.hparams_file)
        if options.recorded_hparams is not None:
            hparams = hparams_from_dict(method.hparams_cls, hparams, options.recorded_hparams, strict=False)
    except (ValueError, TypeError, OSError) as e:
        raise KeditError(f"bad hyper-parameters for {method.name}: {e}") from e
    if method.has("editor"):  # record the editor's full id
        from kedit.edit.trained import resolve_editor

        hparams = dataclasses.replace(hparams, editor=resolve_editor(repo, method.name, hparams.editor).id)
    stats = StatsProvider(repo, hparams, (model, tok), at.commit, corpus=options.corpus, dtype=options.dtype,
                          device=options.device, placement=options.placement, progress=options.progress)
    _warn_locality_about_edited_subjects(requests)
    size = options.batch_size or (len(requests) if method.has("batch") else 1)
    commits = []
    in_effect: list[Adapter] | None = None  # adapters installed in `model`, once an edit has added one
    for start in range(0, len(requests), size):
        batch = requests[start:start + size]
        pairs = [p for r in batch for p in locality_pairs(r)]
        reference = reference_of(model, tok, pairs) if pairs and options.measure else None
        pre = measure(model, tok, batch, reference, fluency=options.fluency) if options.measure else []
        t0 = time.perf_counter()
        result = _apply_method(method, model, tok, batch, hparams, stats, repo)
        edit_s = time.perf_counter() - t0
        _apply_deltas(model, result.deltas)
        if result.adapters:  # the checked and measured model carries them; appending keeps the install incremental
            in_effect = (in_effect if in_effect is not None else [a for _, a in repo.adapters(repo.head())]) \
                + result.adapters
            install_adapters(model, in_effect)
        info = {**result.info, "edit_seconds": round(edit_s, 3), **({"stats": stats.used} if stats.used else {}),
                **_generation_check(model, tok, batch, result.info)}
        ran = hparams_as_run(hparams, result.info)
        commit = repo.commit(result.deltas, adapters=result.adapters, requests=[r.to_dict() for r in batch],
                             method=method.name, hparams=hparams_to_dict(ran), info=info,
                             message=options.message if len(requests) == 1 else None,
                             memory=result.memory or None, expected_parent=at)
        at = HeadState(at.branch, commit.id)
        _load_committed(repo, model, commit.id, result.deltas)
        post = measure(model, tok, batch, reference, fluency=options.fluency) if options.measure else []
        per_request = _per_request(model, tok, batch, reference, options.fluency) \
            if options.measure and len(batch) > 1 else []
        repo.record_metrics(commit.id, as_metrics(pre, "pre") + as_metrics(post, "post") + per_request)
        add_probes(repo, [("edit", r.text, r.target_new, commit.id) for r in batch]
                   + [("locality", p, a, None) for p, a in pairs])
        commits.append(repo.get_commit(commit.id))
    return commits


def hparams_as_run(hparams: Any, method_info: dict[str, Any]) -> Any:
    """The hyper-parameters to record: `v_dtype` as the method's value fits really ran the layers
    above the edit (`v_dtype_used` in its info: the model's own dtype where they had hooks, were
    placed by accelerate or ran the full forward), so that a replay computes the same delta.

    Fits that disagree (a sliding-window model whose longer prompts forced the full forward) keep
    the requested `v_dtype`, which re-derives the same mix on replay; the info lists both."""
    used = method_info.get("v_dtype_used")
    if isinstance(used, list) and len(used) == 1 and hasattr(hparams, "v_dtype"):
        return dataclasses.replace(hparams, v_dtype=used[0])
    return hparams


def _generation_check(model: Any, tok: Any, batch: list[EditRequest], method_info: dict[str, Any]) -> dict[str, Any]:
    """Does each edit show where it will be used: its prompt as the user sends it, greedy generation?

    `model` holds the edit. A method that checked this itself (ROME, MEMIT: `shows_in_generation`
    per request in its info) is taken at its word; for the others it is checked here. An edit that
    does not show is committed (the method did what it could) but reported: a warning, and
    `shows_in_generation: false` with the prompts in the commit's info."""
    reported = [r.get("shows_in_generation") for r in method_info.get("requests", [])]
    if len(reported) != len(batch) or not all(isinstance(x, bool) for x in reported):
        reported = metrics.shows_in_generation(model, tok, [r.text for r in batch], [r.target_new for r in batch])
    missed = [r.text for r, ok in zip(batch, reported, strict=True) if not ok]
    if missed:
        log.warning("%d of %d edits do not show in greedy generation on their own prompt (e.g. %r); committed "
                    "with shows_in_generation false", len(missed), len(batch), missed[0])
        return {"shows_in_generation": False, "not_shown_in_generation": missed}
    return {"shows_in_generation": True}


def _warn_locality_about_edited_subjects(requests: list[EditRequest]) -> None:
    """A locality prompt about another request's subject will change on purpose and count against locality."""
    subject_named = subject_finder({r.subject: r.subject for r in requests})
    clashes = [(p, s) for r in requests for p, _ in locality_pairs(r) if (s := subject_named(p)) and s != r.subject]
    if clashes:
        prompt, subject = clashes[0]
        log.warning("%d locality prompts name the subject of another request (e.g. %r in %r): they will change "
                    "on purpose and lower the locality score; kedit check does not count them", len(clashes),
                    subject, prompt)


def _per_request(model: Any, tok: Any, batch: list[EditRequest], reference: Reference | None,
                 fluency: bool) -> list[Metric]:
    """Each request's own post-edit metrics, with `request` = i (its index in the commit's requests).
    Generation scores are the batch's only: per request they would cost a generate call each; the
    method's info says which requests show in generation."""
    out: list[Metric] = []
    start = 0
    for i, request in enumerate(batch):
        n_pairs = len(locality_pairs(request))
        ref = reference.rows(start, start + n_pairs) if reference is not None else None
        start += n_pairs
        out += as_metrics(measure(model, tok, [request], ref, fluency=fluency, generation=False), "post",
                          request=i)
    return out


def _owner(model: Any, name: str) -> tuple[Any, str]:
    """The module that holds parameter `name`, and the parameter's name there."""
    module_name, _, param = name.rpartition(".")
    return model.get_submodule(module_name), param


@torch.no_grad()
def _apply_deltas(model: Any, deltas: dict[str, Any]) -> None:
    """Add a method's deltas to the loaded model (on whatever device, or offloaded) with the engine's
    canonical arithmetic."""
    for name, step in deltas.items():
        module, param = _owner(model, name)
        write_weight(module, apply_step(read_weight(module, param).detach().cpu(), step), param)


@torch.no_grad()
def _load_committed(repo: Repository, model: Any, commit_id: str, deltas: dict[str, Any]) -> None:
    """Put the committed values (the engine's canonical arithmetic) into the loaded model."""
    values = repo.materialize(commit_id, names=list(deltas))
    for name, value in values.items():
        module, param = _owner(model, name)
        write_weight(module, value, param)
