"""`kedit log --graph`: every branch's history drawn in text lanes, as `git log --graph` does.

Commits are drawn children before parents (newest first among those ready). Each lane waits for
one commit; a merge opens a lane for its second parent right of its own (drawn `|\\`, lanes to its
right moving over), and a commit with several waiting lanes joins them (drawn `|/`).
"""

from __future__ import annotations

from kedit.core.repo import CommitInfo, Repository


def _children_first(commits: dict[str, CommitInfo]) -> list[CommitInfo]:
    """Every commit after all of its children; among those ready, the newest first."""
    waiting = dict.fromkeys(commits, 0)  # children not drawn yet
    for c in commits.values():
        for p in c.parents:
            waiting[p] += 1
    ready = [c for c, n in waiting.items() if n == 0]
    order: list[CommitInfo] = []
    while ready:
        ready.sort(key=lambda cid: (commits[cid].created, commits[cid].depth, cid))
        commit = commits[ready.pop()]
        order.append(commit)
        for p in commit.parents:
            waiting[p] -= 1
            if waiting[p] == 0:
                ready.append(p)
    return order


def render_graph(repo: Repository, limit: int | None = None) -> list[tuple[str, CommitInfo | None]]:
    """(prefix, commit) rows, newest first; rows with commit None are joining or forking lines."""
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
        stack.extend(commits[cid].parents)
    order = _children_first(commits)
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
        lanes[col] = commit.parents[0] if commit.parents else None
        for parent in commit.parents[1:]:
            if parent in lanes:
                continue  # another lane already waits for it: the two join there
            lanes.insert(col + 1, parent)
            cells = ["|" if lane else " " for lane in lanes[: col + 1]] + ["\\"] * (len(lanes) - col - 1)
            rows.append((" ".join(cells), None))
        while lanes and lanes[-1] is None:
            lanes.pop()
    return rows
