"""Edits re-run rather than composed: `kedit revert REV --reapply` and `kedit rebase --onto NEWBASE`.

A stored delta was computed on the model it was made on. After an edit is reverted, the later
deltas were still computed on a model that held it; after a new base model (`kedit init
--add-base`), none of them were computed on it. Both commands therefore re-run the edits'
requests, each commit's requests as one batch with its recorded method and hyper-parameters
(`kedit.edit.run.run_edits`: statistics from the cache of the base the edit now runs on, so a
new base gets its own), as `kedit merge --strategy replay` does.

revert --reapply: REV and every later first-parent commit are reverted (each revert recomputed
from the base, so the state is REV's parent's bit for bit), then the later commits' requests are
re-run on it: the result is the history redone without REV, hash for hash.

rebase --onto: HEAD is detached at NEWBASE, BRANCH's edits in effect (oldest first) are re-run
there, each edit is checked in greedy generation on the old tip and the new one (the user's
`tokenizer(prompt)` + `generate`), and `kedit check` runs at the new tip; only then does BRANCH
move, by compare-and-swap. A failure puts HEAD back; a kill leaves BRANCH where it was (the
partial history is behind a detached HEAD, in the reflog). An edit of a trained editor (MEND,
InstructEdit) is carried only when an editor trained for the new base is stored; else it is
reported as not carried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from kedit.core import history
from kedit.core.errors import KeditError, RevisionError
from kedit.core.refs import BRANCH_PREFIX, short_id
from kedit.core.repo import CommitInfo, Repository
from kedit.core.revisions import reachable
from kedit.edit.run import EditOptions, run_edits
from kedit.methods.base import EditRequest, get_method

log = logging.getLogger(__name__)


def rerun(repo: Repository, commit: CommitInfo, options: EditOptions,
          hparams: dict[str, Any] | None = None) -> list[CommitInfo]:
    """Re-run `commit`'s requests on HEAD as one batch, with its method and (recorded) hyper-parameters."""
    if not commit.requests:
        raise KeditError(f"cannot re-run {commit.short}: it records no requests")
    return run_edits(repo, [EditRequest.from_dict(r) for r in commit.requests], EditOptions(
        **{**vars(options), "method": commit.method, "recorded_hparams": hparams or commit.hparams,
           "batch_size": len(commit.requests), "message": commit.message}))


def _require_edits(repo: Repository, commits: list[str], doing: str) -> None:
    for cid in commits:
        kind = repo.get_commit(cid).kind
        if kind != "edit":
            raise KeditError(f"cannot {doing}: {short_id(cid)} is a {kind} commit and only edit commits can be "
                             "re-run; nothing was changed")


# -- revert --reapply --------------------------------------------------------------------------


@dataclass
class Reapplied:
    """What `revert --reapply` made: the revert of REV, the reverts of the later commits, and the
    commits re-run from each later commit (oldest first)."""

    revert: CommitInfo
    later_reverts: list[str]
    reapplied: dict[str, list[str]] = field(default_factory=dict)


def revert_reapply(repo: Repository, rev: str, *, options: EditOptions | None = None,
                   message: str | None = None) -> Reapplied:
    """Revert `rev`, revert the first-parent commits after it, and re-run those commits' requests,
    so that no later delta was computed on a model that held `rev`. If anything fails, the branch
    goes back to where it was (the reflog keeps the attempt)."""
    options = options or EditOptions(measure=False)
    repo.require_writable()
    at = repo.head_state()
    target = repo.resolve(rev)
    line = history.ancestors(repo.db, at.commit)
    if target not in line:
        raise RevisionError(f"{rev} is not in the first-parent history of HEAD: --reapply re-runs the commits "
                            "after it", rev=rev)
    later = line[:line.index(target)]  # newest first
    _require_edits(repo, [target, *later], "revert with --reapply")
    try:
        first = repo.revert(target, message=message)
        undone = [repo.revert(cid, message=f'Revert "{repo.get_commit(cid).message}" (re-run below)').id
                  for cid in later]
        out = Reapplied(first, undone)
        for cid in reversed(later):
            out.reapplied[cid] = [c.id for c in rerun(repo, repo.get_commit(cid), options)]
    except BaseException:
        if repo.head() != at.commit:
            repo.reset(at.commit, force=True, message=f"revert --reapply {rev}: failed, back to {short_id(at.commit)}")
        raise
    return out


# -- rebase --onto -----------------------------------------------------------------------------


@dataclass
class CarriedEdit:
    """One edit of the branch and what became of it on the new base."""

    commit: str
    method: str | None
    prompts: list[str]
    targets: list[str]
    new: list[str] = field(default_factory=list)  # the commits re-run from it ([] when not carried)
    reason: str | None = None  # why it was not carried
    shown_old: list[bool] = field(default_factory=list)  # per request, at the old tip
    shown_new: list[bool] = field(default_factory=list)  # per request, at the new tip
    check: str | None = None  # ok | broken | None (not checked)
    seconds: float = 0.0

    @property
    def carried(self) -> bool:
        return bool(self.new)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "carried": self.carried}


@dataclass
class RebaseReport:
    branch: str
    onto: str  # the new base commit
    old_tip: str
    new_tip: str | None = None
    edits: list[CarriedEdit] = field(default_factory=list)
    check: dict[str, int] | None = None  # probes, broken
    edit_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def not_carried(self) -> list[CarriedEdit]:
        return [e for e in self.edits if not e.carried]


def rebase(repo: Repository, onto: str, branch: str | None = None, *, options: EditOptions | None = None,
           check_probes: bool = True) -> RebaseReport:
    """Re-run `branch`'s edits (default: the current branch's) on `onto` and move the branch there
    once every carried edit is committed; `check_probes`: run `kedit check` at the new tip."""
    from kedit.eval import metrics
    from kedit.model.load import load_revision

    started = time.perf_counter()
    options = options or EditOptions(measure=False)
    repo.require_writable()
    start = repo.head_state()
    name = branch or start.branch
    if name is None:
        raise KeditError("HEAD is detached: name the branch to rebase (kedit rebase --onto NEWBASE BRANCH)")
    tip = repo.refs.deref(BRANCH_PREFIX + name)
    if tip is None:
        raise RevisionError(f"no branch named {name!r}", rev=name)
    new_base = repo.resolve(onto)
    if new_base in reachable(repo.db, [tip]):
        raise KeditError(f"{onto} is already in the history of {name}: there is nothing to carry onto it")
    _require_same_tensors(repo, tip, new_base, onto)
    ours = reachable(repo.db, [tip]) - reachable(repo.db, [new_base])
    edits = [repo.get_commit(c) for c in history.oldest_first(repo.db, history.edits_in_effect(repo.db, tip) & ours)]
    if not edits:
        raise KeditError(f"{name} has no edit in effect to carry onto {onto}")
    report = RebaseReport(name, new_base, tip)
    report.edits = [CarriedEdit(c.id, c.method, [EditRequest.from_dict(r).text for r in c.requests],
                                [r.get("target_new", "") for r in c.requests]) for c in edits]
    editors = _editors_for(repo, history.ancestors(repo.db, new_base)[-1], edits, report)

    model, tok = load_revision(repo, tip, dtype=options.dtype, device=options.device)
    _shown(report, model, tok, metrics, old=True)
    del model, tok
    repo.checkout(new_base)  # detached: the branch moves only at the end
    try:
        for c, e in zip(edits, report.edits, strict=True):
            if e.reason is not None:
                continue
            t0 = time.perf_counter()
            hparams = {**c.hparams, "editor": editors[c.method]} if c.method in editors else None
            e.new = [m.id for m in rerun(repo, c, options, hparams)]
            e.seconds = round(time.perf_counter() - t0, 3)
        report.edit_seconds = round(sum(e.seconds for e in report.edits), 3)
        report.new_tip = repo.head()
        model, tok = load_revision(repo, report.new_tip, dtype=options.dtype, device=options.device)
        _shown(report, model, tok, metrics, old=False)
        del model, tok
        if check_probes:
            _check(repo, report, options)
        repo.move_branch(name, report.new_tip, expected=tip,
                         message=f"rebase --onto {onto}: {len(edits) - len(report.not_carried)} edit(s) carried")
        repo.checkout(name if start.branch in (None, name) else start.branch)
    except BaseException:
        repo.checkout(start.branch or start.commit, force=True)
        raise
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _require_same_tensors(repo: Repository, tip: str, new_base: str, onto: str) -> None:
    """The edits' tensors must exist with the same shapes at the new base."""
    ours, theirs = repo.manifest(tip), repo.manifest(new_base)
    for n in sorted(ours):
        if n not in theirs:
            raise KeditError(f"{onto} is not the same architecture: it has no tensor {n}; nothing was changed")
        if ours[n].shape != theirs[n].shape:
            raise KeditError(f"{onto} is not the same architecture: {n} is {list(theirs[n].shape)} there, "
                             f"{list(ours[n].shape)} on the branch; nothing was changed")


def _editors_for(repo: Repository, root: str, edits: list[CommitInfo], report: RebaseReport) -> dict[str, str]:
    """Per trained-editor method, the editor trained for the new base `root`; edits without one, or
    without requests, are marked not carried."""
    from kedit.edit.trained import list_editors
    from kedit.eval.metrics import PROMPT_PROTOCOL

    found: dict[str, str | None] = {}
    for c, e in zip(edits, report.edits, strict=True):
        if not c.requests:
            e.reason = "it records no requests to re-run"
            continue
        if c.method is None or not get_method(c.method).has("editor"):
            continue
        if c.method not in found:
            trained = [x for x in list_editors(repo, c.method)
                       if x.base_commit == root and x.prompt_protocol == PROMPT_PROTOCOL]
            found[c.method] = trained[0].id if trained else None
        if found[c.method] is None:
            e.reason = f"no {c.method} editor trained for the new base (kedit train-editor on it)"
    return {method: editor for method, editor in found.items() if editor is not None}


def _shown(report: RebaseReport, model: Any, tok: Any, metrics: Any, *, old: bool) -> None:
    """Per request: does the greedy continuation of its prompt, as the user sends it, contain the target?"""
    todo = [e for e in report.edits if old or e.carried]
    if not todo:
        return
    flat = metrics.shows_in_generation(model, tok, [p for e in todo for p in e.prompts],
                                       [t for e in todo for t in e.targets])
    i = 0
    for e in todo:
        got, i = flat[i:i + len(e.prompts)], i + len(e.prompts)
        if old:
            e.shown_old = got
        else:
            e.shown_new = got


def _check(repo: Repository, report: RebaseReport, options: EditOptions) -> None:
    """`kedit check` at the new tip; each carried edit is ok unless a probe of its commits broke."""
    from kedit.edit.replay import loader
    from kedit.eval.probes import check

    assert report.new_tip is not None
    result = check(repo, report.new_tip, loader(repo, dtype=options.dtype, device=options.device))
    broken = {r.probe.commit_id for r in result.broken if r.probe.kind == "edit"}
    for e in report.edits:
        if e.carried:
            e.check = "broken" if broken & set(e.new) else "ok"
    report.check = {"probes": len(result.results), "broken": len(result.broken)}
