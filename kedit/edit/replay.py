"""Merges that need a model: `kedit merge --strategy replay`, and `--check` after any merge.

Replay: the other side's edits (those still in effect there, oldest first) are re-run on this
side, each commit's requests as one batch with its recorded method and hyper-parameters
(`kedit.edit.run.run_edits`, statistics and trained editors as for `kedit edit`), so every
delta is computed on a model that already holds this side's edits. A merge commit with parents
[HEAD, BRANCH] then records where they came from; its state is the last re-run commit's (the
original deltas are left out). Only edit commits can be replayed (a revert or merge on the other
side refuses the replay, nothing changed); two targets for one fact refuse it too, unless
`take` says which side wins. Each re-run commit is atomic; if any fails, the branch goes back to
where it was (the reflog keeps the attempt).

Check: after the merge, `kedit check` runs at the merge commit: this side's edit probes are held
to their score at the first parent, the other side's to their score at their own commit, and
the locality probes to the first parent and the base. With `check`, an edit of either side that
no longer shows, or a locality probe that fell at the merge (`broken_by_merge`), undoes the merge
(the branch goes back, by compare-and-swap) and raises MergeCheckError naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kedit.core import history
from kedit.core.conflicts import AdapterCheck, request_conflicts, resolve
from kedit.core.errors import KeditError, MergeCheckError, MergeConflictError
from kedit.core.refs import short_id
from kedit.core.repo import HeadState, MergeResult, Repository
from kedit.core.revisions import merge_base, reachable
from kedit.edit.rebase import rerun
from kedit.edit.run import EditOptions
from kedit.eval.probes import CheckReport, ModelLoader, ProbeResult, check

log = logging.getLogger(__name__)

STRATEGIES = ("compose", "replay")


@dataclass
class MergeOutcome:
    """A merge (`result`, as `Repository.merge` returns it), the commits re-run for it, and the check."""

    result: MergeResult
    replayed: dict[str, list[str]] = field(default_factory=dict)  # original commit -> commits re-run from it
    report: CheckReport | None = None


def merge(repo: Repository, rev: str, *, strategy: str = "compose", no_ff: bool = False, take: str | None = None,
          take_subjects: dict[str, str] | None = None, threshold: float | None = None,
          adapter_check: AdapterCheck | None = None, message: str | None = None,
          check_probes: bool = False, load: ModelLoader | None = None, options: EditOptions | None = None,
          probe_threshold: float = 0.1) -> MergeOutcome:
    """Merge `rev` into HEAD with `strategy`; with `load`, run the probe check at the merge commit,
    and with `check_probes`, undo the merge when a probe broke (MergeCheckError). `take` and
    `take_subjects` resolve conflicts as for `Repository.merge`."""
    if strategy not in STRATEGIES:
        raise KeditError(f"--strategy is one of {', '.join(STRATEGIES)}, not {strategy!r}")
    before = repo.head_state()
    if strategy == "compose":
        kwargs: dict[str, Any] = {} if threshold is None else {"threshold": threshold}
        outcome = MergeOutcome(repo.merge(rev, no_ff=no_ff, take=take, take_subjects=take_subjects,
                                          adapter_check=adapter_check, message=message, **kwargs))
    else:
        outcome = _replay(repo, rev, before, no_ff=no_ff, take=take, take_subjects=take_subjects, message=message,
                          options=options or EditOptions(measure=False))
    if load is not None and outcome.result.status == "merged":
        outcome.report = check(repo, outcome.result.head, load, threshold=probe_threshold)
        failed = broken_by_merge(outcome.report)
        if check_probes and failed:
            repo.reset(before.commit, expected=HeadState(before.branch, repo.head()),
                       message=f"merge {rev}: undone, {len(failed)} probe(s) broke")
            raise MergeCheckError(f"{len(failed)} probe(s) broke at the merge of {rev}: "
                                  f"the branch is back at {short_id(before.commit)}", failed)
    return outcome


def broken_by_merge(report: CheckReport) -> list[ProbeResult]:
    """What the merge broke: an edit of either side that no longer shows (held to its score at the
    first parent, or at its own commit for the other side's), or a locality probe that fell below
    its score at the first parent. Drift from the base that a parent already had is not the merge's."""
    return [r for r in report.broken if r.probe.kind == "edit"
            or (r.parent is not None and r.now < r.parent - report.threshold)]


def _replay(repo: Repository, rev: str, at: HeadState, *, no_ff: bool, take: str | None,
            take_subjects: dict[str, str] | None, message: str | None, options: EditOptions) -> MergeOutcome:
    resolve([], take)  # a side that is not ours or theirs, before anything is read
    theirs = repo.resolve(rev)
    if theirs in reachable(repo.db, [at.commit]):
        resolve([], None, take_subjects)  # a subject given where nothing conflicts
        return MergeOutcome(MergeResult("up-to-date", at.commit, at.commit, theirs, theirs))
    base = merge_base(repo.db, at.commit, theirs)
    if base is None:
        raise KeditError(f"HEAD and {rev} have no history in common: nothing to merge from")
    if base == at.commit and not no_ff:  # nothing of ours to replay onto: the same as compose
        return MergeOutcome(repo.merge(rev, take_subjects=take_subjects))
    side = history.oldest_first(repo.db, reachable(repo.db, [theirs]) - reachable(repo.db, [base]))
    refused = [c for c in side if repo.get_commit(c).kind != "edit"]
    if refused:
        raise KeditError(f"cannot replay {short_id(refused[0])}: only edit commits can be re-run "
                         f"(it is a {repo.get_commit(refused[0]).kind}); nothing was changed",
                         hint="kedit merge --strategy compose merges it")
    live = history.edits_in_effect(repo.db, theirs)
    ours = history.oldest_first(repo.db, reachable(repo.db, [at.commit]) - reachable(repo.db, [base]))
    conflicts = request_conflicts({c: repo.get_commit(c).requests for c in ours},
                                  {c: repo.get_commit(c).requests for c in side if c in live})
    if conflicts and take is None and not take_subjects:
        raise MergeConflictError(f"the merge of {short_id(theirs)} into {short_id(at.commit)} has "
                                 f"{len(conflicts)} conflict(s); nothing was changed", conflicts)
    resolution = resolve(conflicts, take, take_subjects)
    left_out = resolution.left_out
    if any(side == "theirs" for side, _ in resolution.took):
        raise KeditError("--take theirs is not possible with --strategy replay: this side's edits are kept as "
                         "they are; merge with --strategy compose --take theirs")
    outcome = MergeOutcome(MergeResult("merged", at.commit, at.commit, theirs, base, conflicts, sorted(left_out),
                                       took=resolution.took))
    here = at
    try:
        for cid in [c for c in side if c in live and c not in left_out]:
            made = rerun(repo, repo.get_commit(cid), options)
            outcome.replayed[cid] = [m.id for m in made]
            here = HeadState(at.branch, made[-1].id)
        merged = repo.record_merge(rev, strategy="replay", replaced=[*outcome.replayed, *left_out],
                                   expected_parent=here, message=message,
                                   info={"replayed": outcome.replayed, "left_out": sorted(left_out),
                                         **({"resolved": {"take": take, "take_subjects": dict(take_subjects or {}),
                                                          "conflicts": resolution.to_dicts()}} if conflicts else {})})
    except BaseException:
        if repo.head() != at.commit:
            repo.reset(at.commit, force=True, message=f"merge {rev}: replay failed, back to {short_id(at.commit)}")
        raise
    outcome.result.head = merged.id
    return outcome


def loader(repo: Repository, **kwargs: Any) -> Callable[[str], Any]:
    """A ModelLoader for the check: each revision loaded as `kedit check` loads it."""
    from kedit.model.load import load_revision

    return lambda commit: load_revision(repo, commit, **kwargs)
