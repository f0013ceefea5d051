"""`kedit report REV..REV --out report.html`: the web view of a range of commits as one
self-contained HTML file (plotly.js inlined, nothing fetched), to attach to a pull request or a
model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kedit.core.errors import KeditError
from kedit.core.revisions import split_range
from kedit.core.store import atomic_write_bytes
from kedit.repository import Repository
from kedit.ui import views
from kedit.ui.pages import Pages


@dataclass(frozen=True)
class Report:
    path: Path
    commits: list[str]  # ids, oldest first
    bytes: int
    behaviour_changed: int | None  # prompts whose continuation differs between the ends (None: not compared)


def write_report(repo: Repository, spec: str, out: Path, *, behaviour: bool = False) -> Report:
    """Render the commits `spec` names (a range A..B, or one revision's history) to `out`.

    `behaviour`: also the behavioural diff between the range's ends (the commit before the
    range's oldest, and its newest) on the probe suite, as `kedit diff --behaviour` computes it
    (it loads both models, and the base that writes the KL divergence's reference texts)."""
    commits = views.commits_of(repo, [spec])
    if not commits:
        raise KeditError(f"{spec} names no commits", hint="kedit log " + spec)
    diff = None
    if behaviour:
        parts = split_range(spec)
        start = parts[0] if parts else (commits[0].parent or commits[0].id)
        from kedit.eval.behaviour import compare, watched_prompts

        diff = compare(repo, repo.load, start, commits[-1].id, watched_prompts(repo))
    html = Pages(repo, server=False).report(spec, commits, diff).encode("utf-8")
    out = out.resolve()
    atomic_write_bytes(out, html, durable=False)
    return Report(out, [c.id for c in commits], len(html), len(diff.changed) if diff else None)
