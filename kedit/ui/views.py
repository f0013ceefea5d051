"""What the pages show, as plain data read through the repository's APIs: the log with its graph
lanes, one commit (requests, hyper-parameters, tensor changes, adapters, metrics, the probe
outputs `kedit check` kept), metric trends along a history, and the probe suite.

Nothing here writes, loads a model or knows HTML: `kedit ui`, `kedit report` and
`kedit log --plot` all render these same values, so the browser, the report file and the PNG
agree with `kedit log` and `kedit show`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kedit.core import history
from kedit.core.graph import render_graph
from kedit.core.repo import CommitInfo, Metric, Repository
from kedit.eval.probes import (
    DEFAULT_THRESHOLD,
    KeptOutput,
    Probe,
    edited_subjects,
    kept_outputs,
    list_probes,
    setting_protocol,
    subject_finder,
)

# The metrics a trend shows at first (the others are one click away in the legend): how often the
# edit shows, in generation and teacher-forced, what it disturbs, and whether the text stays fluent.
FEATURED = ("efficacy", "gen_efficacy", "reliability", "locality", "neighbourhood", "gen_locality", "fluency")
WHOLE_STAGES = ("post", "eval")  # a commit's scores after the edit, and of `kedit eval`


def decorations(repo: Repository) -> dict[str, list[str]]:
    """The refs at each commit, as `kedit log` decorates it: `HEAD -> main`, `tag: v1`, `HEAD` when detached."""
    out: dict[str, list[str]] = {}
    head_branch = repo.head_branch()
    if head_branch is None and repo.head():
        out.setdefault(repo.head(), []).append("HEAD")  # type: ignore[arg-type]
    for name, target in repo.refs.branches().items():
        out.setdefault(target, []).append(f"HEAD -> {name}" if name == head_branch else name)
    for name, target in repo.refs.tags().items():
        out.setdefault(target, []).append(f"tag: {name}")
    return out


def series_name(metric: Metric) -> str:
    """A metric's line in a trend: its name, marked when `kedit eval` (not the edit) measured it."""
    return metric.name if metric.stage == "post" else f"{metric.name} ({metric.stage})"


def whole_commit_metrics(commit: CommitInfo) -> dict[str, Metric]:
    """{series name: metric} of the scores about the whole commit (not one request of a batch)."""
    return {series_name(m): m for m in commit.metrics
            if m.stage in WHOLE_STAGES and m.request is None}


def per_request_metrics(commit: CommitInfo) -> dict[int, list[Metric]]:
    """{request number: its scores} of a batch edit."""
    out: dict[int, list[Metric]] = {}
    for m in commit.metrics:
        if m.request is not None:
            out.setdefault(m.request, []).append(m)
    return dict(sorted(out.items()))


def request_prompt(request: dict[str, Any]) -> str:
    """A request's prompt with its subject in place of `{}`, as a user would type it."""
    return str(request.get("prompt", "")).replace("{}", str(request.get("subject", "")))


# -- the log ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogRow:
    """One row of the log: its graph lanes, and the commit (None on a row that only joins lanes)."""

    lanes: str
    commit: CommitInfo | None
    refs: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Metric]:
        return whole_commit_metrics(self.commit) if self.commit else {}


def log_rows(repo: Repository, limit: int | None = None) -> list[LogRow]:
    """Every branch's history as `kedit log --graph` draws it, newest first."""
    refs = decorations(repo)
    return [LogRow(prefix.rstrip(), c, refs.get(c.id, []) if c else []) for prefix, c in render_graph(repo, limit)]


# -- one commit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterView:
    op: str  # add | remove
    object_id: str
    kind: str
    config: dict[str, Any]

    @property
    def entries(self) -> list[dict[str, Any]]:
        """What the adapter lists for people (GRACE: one entry per edit, with prompt and target)."""
        return list(self.config.get("entries", []))


@dataclass(frozen=True)
class CheckRow:
    """A probe at a commit, from outputs a `kedit check` kept: its score now, at the parent and
    (locality) its agreement with the base, and whether it fell as `kedit check` counts a fall."""

    probe: Probe
    setting: str
    output: Any
    now: float
    parent: float | None
    fell: bool
    edited_by: str | None = None  # locality: the edit in effect whose subject the prompt names

    @property
    def text(self) -> str:
        """The output as a person reads it: a continuation, or the count of argmax tokens."""
        return self.output if isinstance(self.output, str) else f"{len(self.output)} answer tokens (argmax ids)"


@dataclass
class CommitPage:
    commit: CommitInfo
    refs: list[str]
    tensors: list[history.Change]
    adapters: list[AdapterView]
    metrics: list[Metric]  # about the whole commit
    per_request: dict[int, list[Metric]]
    checks: list[CheckRow]

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [{**r, "shown_prompt": request_prompt(r)} for r in self.commit.requests]

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The method's scalar diagnostics (`info`), as `kedit show` lists them."""
        return {k: v for k, v in self.commit.info.items() if isinstance(v, int | float | str | bool) and k != "note"}


def adapter_config(repo: Repository, object_id: str) -> dict[str, Any]:
    """An adapter object's JSON config (its tensors are not read)."""
    _, metadata = repo.store.get_tensors(object_id)
    return json.loads(metadata.get("config", "{}"))


def commit_page(repo: Repository, rev: str) -> CommitPage:
    commit = repo.get_commit(repo.resolve(rev))
    adapters = [AdapterView(op, oid, kind, adapter_config(repo, oid)) for op, oid, kind in repo.adapter_ops(commit.id)]
    metrics = [m for m in commit.metrics if m.request is None]
    return CommitPage(commit, decorations(repo).get(commit.id, []), repo.changes(commit.id), adapters, metrics,
                      per_request_metrics(commit), check_rows(repo, commit))


def _score(kept: KeptOutput, base: KeptOutput | None) -> float | None:
    """`kedit check`'s score of a kept output: an edit probe's accuracy; a locality probe's
    agreement with the base's output (None when the base's output under that setting is not kept)."""
    if kept.probe.kind != "locality":
        return kept.score
    protocol = setting_protocol(kept.setting)
    if base is None or protocol is None:
        return None
    return protocol.agreement(kept.output, base.output, kept.probe.answer)


def check_rows(repo: Repository, commit: CommitInfo, threshold: float = DEFAULT_THRESHOLD) -> list[CheckRow]:
    """The probe outputs kept at `commit`, each scored as `kedit check` scores it and marked as it
    marks a fall: more than `threshold` below the parent, or below what it is held to (a locality
    probe: the base, which it agrees with fully; an edit probe: its edit's own commit, where kept).
    A locality probe whose prompt names the subject of an edit in effect is that edit's change,
    not a fall (`edited_by`)."""
    here = kept_outputs(repo, [commit.id])[commit.id]
    if not here:  # most commits: no check kept outputs there, so nothing to read along the history
        return []
    base = history.ancestors(repo.db, commit.id)[-1]
    edits = {k.probe.commit_id for k in here if k.probe.kind == "edit" and k.probe.commit_id}
    kept = kept_outputs(repo, [commit.id, base, *([commit.parent] if commit.parent else []), *edits])
    by_key = {cid: {(k.probe.id, k.setting): k for k in outs} for cid, outs in kept.items()}
    edited_by = subject_finder(edited_subjects(repo, history.edits_in_effect(repo.db, commit.id)))
    rows = []
    for k in here:
        key = (k.probe.id, k.setting)
        now = _score(k, by_key[base].get(key))
        if now is None:
            continue
        parent_kept = by_key.get(commit.parent or "", {}).get(key)
        parent = _score(parent_kept, by_key[base].get(key)) if parent_kept else None
        held_kept = by_key.get(k.probe.commit_id or "", {}).get(key)
        held = 1.0 if k.probe.kind == "locality" else (held_kept.score if held_kept else None)
        by = edited_by(k.probe.prompt) if k.probe.kind == "locality" else None
        fell = any(before is not None and now < before - threshold for before in (parent, held))
        rows.append(CheckRow(k.probe, k.setting, k.output, now, parent, fell and not by, by))
    return rows


# -- trends -----------------------------------------------------------------------------------


@dataclass
class Trend:
    """Metrics along a line of commits, oldest first: one x position per commit, so a commit
    without a score leaves a gap rather than shifting the others."""

    commits: list[CommitInfo]
    series: dict[str, list[float | None]]
    protocols: dict[str, str]
    per_request: dict[str, list[tuple[int, int, float]]]  # metric -> (commit index, request, value)

    def names(self) -> list[str]:
        """Series names, the featured ones first."""
        rank = {name: i for i, name in enumerate(FEATURED)}
        return sorted(self.series, key=lambda s: (rank.get(s, len(rank)), s))


def trend_of(commits: list[CommitInfo]) -> Trend:
    """The trend of `commits`, given oldest first."""
    series: dict[str, list[float | None]] = {}
    protocols: dict[str, str] = {}
    per_request: dict[str, list[tuple[int, int, float]]] = {}
    for i, commit in enumerate(commits):
        for name, metric in whole_commit_metrics(commit).items():
            series.setdefault(name, [None] * len(commits))[i] = metric.value
            protocols[name] = metric.protocol
        for request, scores in per_request_metrics(commit).items():
            for m in scores:
                if m.stage in WHOLE_STAGES:
                    per_request.setdefault(series_name(m), []).append((i, request, m.value))
    return Trend(commits, series, protocols, per_request)


def first_parent_line(repo: Repository, rev: str = "HEAD") -> list[CommitInfo]:
    """The first-parent history of `rev`, oldest first (what a trend is drawn along)."""
    return repo.log(rev)[::-1]


def commits_of(repo: Repository, revs: list[str]) -> list[CommitInfo]:
    """The commits `kedit log REVS` lists (ranges, several revisions, ^REV), oldest first."""
    from kedit.core.revisions import select

    return [repo.get_commit(c) for c in reversed(select(repo.db, repo.refs, revs))]


# -- the probe suite --------------------------------------------------------------------------


def probe_suite(repo: Repository) -> list[Probe]:
    return list_probes(repo)
