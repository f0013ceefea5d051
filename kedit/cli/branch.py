"""Commands that move HEAD and refs: checkout, reset, branch, tag, revert, merge, cherry-pick, rebase."""

from __future__ import annotations

import click

from kedit.cli.common import command, device_option, dtype_option, json_option, open_repo, ref_decorations, say
from kedit.cli.jsonout import commit_json, emit_json
from kedit.core.conflicts import DEFAULT_THRESHOLD
from kedit.core.refs import short_id


@command()
@click.argument("rev")
@click.option("-f", "--force", is_flag=True, help="Overwrite tensors changed by hand in the working model.")
@json_option
@click.pass_context
def checkout(ctx: click.Context, rev: str, force: bool, as_json: bool) -> None:
    """Switch to a branch, or detach HEAD at a commit, updating only the tensors that differ.

    \b
    Example:
        kedit checkout experiment
        kedit checkout HEAD~3
    """
    repo = open_repo(ctx)
    commit_id = repo.checkout(rev, force=force)
    branch = repo.head_branch()
    if as_json:
        emit_json(head=commit_id, branch=branch)
        return
    say(ctx, f"Switched to branch '{branch}'" if branch else f"HEAD is now at {short_id(commit_id)} (detached)")


@command()
@click.argument("rev")
@click.option("-f", "--force", is_flag=True, help="Overwrite tensors changed by hand in the working model.")
@json_option
@click.pass_context
def reset(ctx: click.Context, rev: str, force: bool, as_json: bool) -> None:
    """Move the current branch to REV. The old position stays in `kedit reflog`.

    \b
    Example:
        kedit reset HEAD~1      # drop the last edit from this branch
        kedit reset 'HEAD@{1}'  # undo that: where HEAD was before its last move
    """
    repo = open_repo(ctx)
    commit_id = repo.reset(rev, force=force)
    if as_json:
        emit_json(head=commit_id, branch=repo.head_branch())
        return
    say(ctx, f"HEAD is now at {short_id(commit_id)}")


@command()
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
    repo = open_repo(ctx)
    if name is None:
        branches, current = repo.refs.branches(), repo.head_branch()
        if as_json:
            emit_json(current=current, branches=branches)
            return
        for b, target in branches.items():
            click.echo(f"{'*' if b == current else ' '} {b:<24} {short_id(target)}")
        return
    if delete:
        target = repo.delete_branch(name)
        say(ctx, f"Deleted branch {name} (was {short_id(target)})")
    else:
        target = repo.create_branch(name, rev)
        say(ctx, f"Created branch {name} at {short_id(target)}")
    if as_json:
        emit_json(branch=name, commit=target, deleted=delete)


@command()
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
    repo = open_repo(ctx)
    if name is None:
        tags = repo.refs.tags()
        if as_json:
            emit_json(tags=tags)
            return
        for t, target in tags.items():
            click.echo(f"{t:<24} {short_id(target)}")
        return
    if delete:
        target = repo.delete_tag(name)
        say(ctx, f"Deleted tag {name} (was {short_id(target)})")
    else:
        target = repo.create_tag(name, rev)
        say(ctx, f"Tagged {short_id(target)} as {name}")
    if as_json:
        emit_json(tag=name, commit=target, deleted=delete)


@command()
@click.argument("rev")
@click.option("-m", "--message", help="Message of the revert commit.")
@click.option("--reapply", is_flag=True,
              help="Also revert the later commits and re-run their requests on the model without REV.")
@device_option
@dtype_option
@json_option
@click.pass_context
def revert(ctx: click.Context, rev: str, message: str | None, reapply: bool, device: str, dtype: str | None,
           as_json: bool) -> None:
    """Undo REV with a new commit whose tensors are recomputed from the history without it.

    Reverting never subtracts: later edits are replayed on the base without REV's delta, so
    reverting every edit gives the base bit for bit. Those later deltas were computed on a model
    that held REV; --reapply reverts them too and re-runs their requests (recorded method and
    hyper-parameters), giving the history redone without REV.

    \b
    Example:
        kedit revert HEAD~2
        kedit revert HEAD~2 --reapply
    """
    repo = open_repo(ctx)
    if reapply:
        _revert_reapply(ctx, repo, rev, message, device, dtype, as_json)
        return
    commit = repo.revert(rev, message=message)
    later = commit.info.get("later_commits", [])
    if as_json:
        emit_json(branch=repo.head_branch(), commit=commit_json(commit, ref_decorations(repo).get(commit.id)),
                  later_commits=later)
        return
    click.echo(f"[{repo.head_branch() or 'detached'} {commit.short}] {commit.message}")
    if later:
        say(ctx, f"note: {len(later)} later edit(s) were made on a model that contained the reverted one; "
                  "re-evaluate them (kedit check)")


def _revert_reapply(ctx: click.Context, repo, rev: str, message: str | None, device: str, dtype: str | None,
                    as_json: bool) -> None:
    from kedit.edit.rebase import revert_reapply
    from kedit.edit.run import EditOptions
    from kedit.model.load import parse_dtype

    done = revert_reapply(repo, rev, message=message,
                          options=EditOptions(measure=False, dtype=parse_dtype(dtype), device=device))
    later = done.revert.info.get("later_commits", [])
    if as_json:
        emit_json(branch=repo.head_branch(), commit=commit_json(done.revert, ref_decorations(repo).get(done.revert.id)),
                  later_commits=later, later_reverts=done.later_reverts, reapplied=done.reapplied)
        return
    click.echo(f"[{repo.head_branch() or 'detached'} {done.revert.short}] {done.revert.message}")
    for old, new in done.reapplied.items():
        click.echo(f"  re-ran {short_id(old)} -> {' '.join(short_id(c) for c in new)}  {repo.get_commit(old).message}")
    say(ctx, f"{len(done.reapplied)} later edit(s) re-run on the model without {rev}; HEAD is {short_id(repo.head())}")


def _parse_takes(_ctx: click.Context, _param: click.Parameter,
                 values: tuple[str, ...]) -> tuple[str | None, dict[str, str]]:
    """--take values as (the plain side or None, {subject: side}); a subject's text may hold '='."""
    take, by_subject = None, {}
    for value in values:
        subject, eq, side = value.rpartition("=")
        if side not in ("ours", "theirs") or (eq and not subject.strip()):
            raise click.BadParameter(f"{value!r} is not ours, theirs or SUBJECT=ours|theirs")
        if not eq:
            if take not in (None, side):
                raise click.BadParameter("give one plain --take: ours or theirs")
            take = side
        elif by_subject.setdefault(subject.strip(), side) != side:
            raise click.BadParameter(f"{subject.strip()!r} is given both ours and theirs")
    return take, by_subject


@command()
@click.argument("rev")
@click.option("--strategy", type=click.Choice(["compose", "replay"]), default="compose", show_default=True,
              help="compose: the merge base plus both sides' stored deltas, recomputed (no model needed); "
                   "replay: REV's edit requests re-run on this side with their recorded methods.")
@click.option("--no-ff", is_flag=True, help="Make a merge commit even when HEAD could fast-forward.")
@click.option("--take", "takes", multiple=True, metavar="[SUBJECT=]ours|theirs", callback=_parse_takes,
              help="Resolve conflicts: keep this side's conflicting edits and leave the other side's out. "
                   "SUBJECT=ours|theirs resolves only the conflicts of that subject (matched exactly, "
                   "case-sensitive); repeatable, a plain ours|theirs then covers the rest.")
@click.option("--threshold", type=click.FloatRange(0, None, min_open=True), default=DEFAULT_THRESHOLD,
              show_default=True, help="Key overlap above which two edits of one tensor conflict.")
@click.option("--check", "check_probes", is_flag=True,
              help="Run kedit check at the merge (both sides' probes); undo the merge and exit 1 if one broke.")
@click.option("-m", "--message", help="Message of the merge commit.")
@device_option
@dtype_option
@json_option
@click.pass_context
def merge(ctx: click.Context, rev: str, strategy: str, no_ff: bool, takes: tuple, threshold: float,
          check_probes: bool, message: str | None, device: str, dtype: str | None, as_json: bool) -> None:
    """Merge REV's edits into the current branch (fast-forward when possible).

    The merge commit's tensors are the merge base's with both sides' stored deltas applied,
    this branch's first, then REV's, each oldest first (--strategy compose), or this branch's
    with REV's requests re-run on it (--strategy replay). Conflicting edits (the same subject and
    prompt set to different targets, edits of one tensor that move each other's key, GRACE
    entries whose balls overlap with different targets) stop the merge with a report and exit
    status 1, nothing changed; --take ours|theirs resolves them all, --take SUBJECT=ours|theirs
    those of one subject (a merge with any left uncovered stops the same way, listing them).

    \b
    Example:
        kedit merge experiment
        kedit merge experiment --take ours
        kedit merge experiment --take Paris=theirs --take 'Eiffel Tower=ours'
        kedit merge experiment --strategy replay --check
    """
    from kedit.core.errors import MergeConflictError
    from kedit.model.adapters import conflict_check

    repo = open_repo(ctx)
    report = None
    take, take_subjects = takes
    try:
        if strategy == "compose" and not check_probes:  # no model: nothing heavier than the engine is imported
            result = repo.merge(rev, no_ff=no_ff, take=take, take_subjects=take_subjects, threshold=threshold,
                                adapter_check=conflict_check, message=message)
        else:
            from kedit.core.errors import MergeCheckError
            from kedit.edit.replay import broken_by_merge, loader
            from kedit.edit.replay import merge as merge_with_model
            from kedit.edit.run import EditOptions
            from kedit.model.load import parse_dtype

            torch_dtype = parse_dtype(dtype)
            try:
                outcome = merge_with_model(
                    repo, rev, strategy=strategy, no_ff=no_ff, take=take, take_subjects=take_subjects,
                    threshold=threshold,
                    adapter_check=conflict_check, message=message, check_probes=check_probes,
                    load=loader(repo, dtype=torch_dtype, device=device) if check_probes else None,
                    options=EditOptions(dtype=torch_dtype, device=device, measure=False))
            except MergeCheckError as e:
                ctx.obj["exit_code"] = 1
                _echo_broken(e.broken, as_json)
                raise
            result, report = outcome.result, outcome.report
    except MergeConflictError as e:
        ctx.obj["exit_code"] = 1
        if as_json:
            emit_json(status="conflict", conflicts=[c.to_dict() for c in e.conflicts])
        else:
            left = (f"{len(e.conflicts)} conflicting edit pair(s)" if e.total == len(e.conflicts) else
                    f"{len(e.conflicts)} of {e.total} conflicting edit pair(s) not covered by --take")
            click.echo(f"CONFLICT: {left}; nothing was changed")
            for c in e.conflicts:
                about = f"  [{', '.join(c.subjects)}]" if c.subjects else ""
                click.echo(f"  {c.kind:<11} ours {short_id(c.ours)}  theirs {short_id(c.theirs)}  {c.what}{about}")
        raise
    if as_json:
        emit_json(status=result.status, head=result.head, branch=repo.head_branch(), base=result.base,
                  ours=result.ours, theirs=result.theirs, strategy=strategy, tensors=result.tensors,
                  adapter_ops=result.adapter_ops, conflicts=result.conflict_dicts(),
                  left_out=result.left_out,
                  check=None if report is None else {"probes": len(report.results), "broken": len(report.broken),
                                                     "broken_by_merge": len(broken_by_merge(report))})
        return
    if result.status == "up-to-date":
        say(ctx, "Already up to date.")
    elif result.status == "fast-forward":
        say(ctx, f"Fast-forward {short_id(result.ours)}..{short_id(result.head)}")
    else:
        commit = repo.get_commit(result.head)
        click.echo(f"[{repo.head_branch() or 'detached'} {commit.short}] {commit.message}")
        say(ctx, f"Merged {short_id(result.theirs)} (base {short_id(result.base or '')}, {strategy}): "
                 f"{result.tensors} tensor(s), {result.adapter_ops} adapter operation(s)")
        for c, (side, by) in zip(result.conflicts, result.took, strict=True):
            say(ctx, f"  took {side:<6} {c.kind:<11} ours {short_id(c.ours)}  theirs {short_id(c.theirs)}"
                     + (f"  (--take {by}={side})" if by is not None else ""))
        if result.left_out:
            say(ctx, f"Left out {len(result.left_out)} conflicting commit(s) of the other side: "
                     + ", ".join(short_id(c) for c in result.left_out))
    if report is not None:
        say(ctx, f"check: {len(report.broken)} broken of {len(report.results)} probes "
                 f"({len(broken_by_merge(report))} by the merge)")


def _echo_broken(broken: list, as_json: bool) -> None:
    """The probes that broke at a merge that --check undid."""
    if as_json:
        emit_json(status="check-failed", broken=[{"probe": r.probe.__dict__, "parent": r.parent, "now": r.now,
                                                  "against": r.against} for r in broken])
        return
    for r in broken:
        click.echo(f"BROKE {r.probe.kind:<8} #{r.probe.id:<4} {r.now:.2f}  {r.probe.prompt!r} -> {r.probe.answer!r}")


@command("cherry-pick")
@click.argument("rev")
@click.option("-m", "--message", help="Message of the new commit (default: REV's).")
@json_option
@click.pass_context
def cherry_pick(ctx: click.Context, rev: str, message: str | None, as_json: bool) -> None:
    """Apply the edit REV's stored deltas and adapters to HEAD as a new commit that names REV.

    The new commit also holds REV's probes, so `kedit check` runs them on it.

    \b
    Example:
        kedit cherry-pick experiment~2
        kedit check             # REV's edit probes, scored at the new commit
    """
    from kedit.core.tables import probe_rows

    repo = open_repo(ctx)
    commit = repo.cherry_pick(rev, message=message)
    carried = sum(1 for row in probe_rows(repo.db) if row[4] == commit.id)
    if as_json:
        emit_json(branch=repo.head_branch(), commit=commit_json(commit, ref_decorations(repo).get(commit.id)),
                  picked_from=commit.info.get("cherry_picked_from"), probes=carried)
        return
    click.echo(f"[{repo.head_branch() or 'detached'} {commit.short}] {commit.message}")
    say(ctx, f"(cherry picked from commit {commit.info.get('cherry_picked_from')}, with its {carried} probe(s)); "
             "re-evaluate it (kedit check)")


@command()
@click.option("--onto", "onto", required=True, help="The base to carry the edits onto (kedit init --add-base).")
@click.argument("branch", required=False)
@click.option("--no-check", is_flag=True, help="Skip kedit check at the new tip.")
@device_option
@dtype_option
@json_option
@click.pass_context
def rebase(ctx: click.Context, onto: str, branch: str | None, no_check: bool, device: str, dtype: str | None,
           as_json: bool) -> None:
    """Re-run BRANCH's edits (default: the current branch's) on the base ONTO and move BRANCH there.

    Each edit's requests run in order with the recorded method and hyper-parameters (statistics
    recomputed for the new base and cached). BRANCH moves only when every carried edit is
    committed; a failure leaves it where it was. Reported per edit: whether greedy generation
    on its prompt shows the target on the old tip and the new one, and what kedit check says.
    MEND/InstructEdit edits without an editor trained for the new base are not carried.

    \b
    Example:
        kedit init --add-base ./model-v1.1 --branch v1.1
        kedit rebase --onto v1.1
    """
    from kedit.edit.rebase import rebase as run_rebase
    from kedit.edit.run import EditOptions
    from kedit.model.load import parse_dtype

    repo = open_repo(ctx)
    report = run_rebase(repo, onto, branch, check_probes=not no_check,
                        options=EditOptions(measure=False, dtype=parse_dtype(dtype), device=device))
    if as_json:
        emit_json(branch=report.branch, onto=report.onto, old=report.old_tip, new=report.new_tip,
                  edits=[e.to_dict() for e in report.edits], not_carried=[e.commit for e in report.not_carried],
                  check=report.check, edit_seconds=report.edit_seconds, seconds=report.seconds)
        return
    click.echo(f"{'old':<9}{'new':<9}{'method':<8}{'old base':<10}{'new base':<10}{'check':<8}edit")
    for e in report.edits:
        click.echo(f"{short_id(e.commit):<9}{(short_id(e.new[-1]) if e.new else '-'):<9}{(e.method or '-'):<8}"
                   f"{_shown(e.shown_old):<10}{_shown(e.shown_new):<10}{(e.check or '-'):<8}"
                   f"{e.prompts[0] if e.prompts else ''} -> {e.targets[0] if e.targets else ''}"
                   + (f"  (not carried: {e.reason})" if e.reason else ""))
    carried = len(report.edits) - len(report.not_carried)
    say(ctx, f"{report.branch}: {carried} of {len(report.edits)} edit(s) carried onto {short_id(report.onto)} "
             f"in {report.seconds:.1f} s; now at {short_id(report.new_tip or '')}"
             + (f"; check: {report.check['broken']} broken of {report.check['probes']} probes" if report.check else ""))


def _shown(got: list[bool]) -> str:
    """How many of an edit's requests show in generation, as 'k/n' ('-' when not measured)."""
    return f"{sum(got)}/{len(got)}" if got else "-"
