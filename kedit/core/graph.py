"""`kedit log --graph`: every branch's history drawn in text lanes, as `git log --graph` does.

History is first-parent only, so the commits reachable from the refs form a tree: each lane
waits for one commit, a commit with several waiting lanes joins them (drawn `|/`).
"""

from __future__ import annotations

from kedit.core.repo import CommitInfo, Repository


def render_graph(repo: Repository, limit: int | None = None) -> list[tuple[str, CommitInfo | None]]:
    """(prefix, commit) rows, newest first; rows with commit None are joining lines."""
    tips = set(repo.refs.branches().values()) | set(repo.refs.tags().values())
    if repo.head():
        tips.add(repo.head())
    commits: dict[str, CommitInfo] = {}
    stack = list(tips)
    while stack:
        cid = stack.pop()
        if cid in commits:
            continue
        commits[cid] = repo.get_commit(cid)
        if commits[cid].parent:
            stack.append(commits[cid].parent)  # type: ignore[arg-type]
    order = sorted(commits.values(), key=lambda c: (c.depth, c.created), reverse=True)
    lanes: list[str | None] = []
    rows: list[tuple[str, CommitInfo | None]] = []
    for commit in order[:limit] if limit else order:
        waiting = [i for i, lane in enumerate(lanes) if lane == commit.id]
        if not waiting:
            lanes.append(commit.id)
            waiting = [len(lanes) - 1]
        col = waiting[0]
        rows.append((" ".join("*" if i == col else ("|" if lane else " ") for i, lane in enumerate(lanes)) + " ",
                     commit))
        for extra in reversed(waiting[1:]):
            cells = ["|" if lane else " " for lane in lanes]
            cells[extra] = "/"
            rows.append((" ".join(cells[: extra + 1]), None))
            lanes[extra] = None
        lanes[col] = commit.parent
        while lanes and lanes[-1] is None:
            lanes.pop()
    return rows
