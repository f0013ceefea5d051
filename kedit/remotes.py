"""Remotes: named Hugging Face Hub repositories, and what kedit last saw of their branches.

A remote is a name and a URL: `hf://OWNER/REPO` (the endpoint comes from $HF_ENDPOINT, else
huggingface.co) or `https://HOST[:PORT]/OWNER/REPO` (the endpoint is the URL's own). They live
in the history database (migration 0004_remotes) because a fetch must record, in the same
transaction as the commits it brings, where the remote branch was: the remote-tracking ref
`refs/remotes/NAME/BRANCH` (a kedit commit, kept alive by gc like any ref) and the Hub commit
sha, which is the `parent_commit` of the next push.

The token is never stored: `hub_api` asks huggingface_hub for it ($HF_TOKEN, then the login
cache) each time, and `scrub` removes it from any text that might be shown.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from kedit import db as dbm
from kedit.errors import RemoteError
from kedit.refs import check_ref_name, now_iso

DEFAULT_ENDPOINT = "https://huggingface.co"
REMOTE_PREFIX = "refs/remotes/"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint: str
    repo_id: str


@dataclass(frozen=True)
class Tracking:
    """Where a remote branch was when kedit last pushed to or fetched from it."""

    kedit_commit: str
    hub_commit: str
    checkpoint_commit: str | None


def parse_url(url: str) -> tuple[str, str]:
    """(endpoint, repo_id) of a remote URL; RemoteError saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise RemoteError("a remote URL may not hold credentials",
                          hint="put the token in HF_TOKEN or run 'hf auth login'")
    if parts.scheme == "hf":
        repo_id = (parts.netloc + parts.path).strip("/")
        endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    elif parts.scheme in ("http", "https") and parts.netloc:
        repo_id = parts.path.strip("/")
        endpoint = f"{parts.scheme}://{parts.netloc}"
    else:
        raise RemoteError(f"{url!r} is not a Hub URL", hint="use hf://OWNER/REPO or https://HOST/OWNER/REPO")
    repo_id = repo_id.removeprefix("models/")
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id:
        raise RemoteError(f"{url!r} does not name a repository as OWNER/REPO")
    return endpoint, repo_id


def add(db, name: str, url: str) -> Remote:
    check_ref_name(name, "remote")
    if "/" in name:
        raise RemoteError(f"invalid remote name {name!r}: it may not contain '/'")
    endpoint, repo_id = parse_url(url)
    with dbm.write(db):
        if dbm.one(db, "SELECT 1 FROM remotes WHERE name = ?", [name]):
            raise RemoteError(f"a remote named {name!r} already exists", hint=f"kedit remote remove {name}")
        db.execute("INSERT INTO remotes (name, url, created) VALUES (?, ?, ?)", [name, url, now_iso()])
    return Remote(name, url, endpoint, repo_id)


def get(db, name: str | None) -> Remote:
    """The remote `name`, or when None the only one there is (or 'origin')."""
    if name is None:
        names = [r[0] for r in db.execute("SELECT name FROM remotes ORDER BY name")]
        if not names:
            raise RemoteError("this repository has no remote", hint="kedit remote add origin hf://OWNER/REPO")
        name = "origin" if "origin" in names or len(names) != 1 else names[0]
    row = dbm.one(db, "SELECT url FROM remotes WHERE name = ?", [name])
    if row is None:
        raise RemoteError(f"no remote named {name!r}", hint="kedit remote list")
    endpoint, repo_id = parse_url(row[0])
    return Remote(name, row[0], endpoint, repo_id)


def list_all(db) -> list[Remote]:
    return [get(db, r[0]) for r in db.execute("SELECT name FROM remotes ORDER BY name")]


def remove(db, name: str) -> None:
    with dbm.write(db):
        if not dbm.one(db, "SELECT 1 FROM remotes WHERE name = ?", [name]):
            raise RemoteError(f"no remote named {name!r}", hint="kedit remote list")
        prefix = f"{REMOTE_PREFIX}{name}/"
        db.execute("DELETE FROM refs WHERE substr(name, 1, ?) = ?", [len(prefix), prefix])  # LIKE would treat _
        db.execute("DELETE FROM remotes WHERE name = ?", [name])  # cascades to remote_branches


def tracking_ref(remote: str, branch: str) -> str:
    return f"{REMOTE_PREFIX}{remote}/{branch}"


def tracking(db, remote: str, branch: str) -> Tracking | None:
    row = dbm.one(db, """SELECT r.target, b.hub_commit, b.checkpoint_commit FROM remote_branches b
                         JOIN refs r ON r.name = ? WHERE b.remote = ? AND b.branch = ?""",
                  [tracking_ref(remote, branch), remote, branch])
    return Tracking(*row) if row else None


def tracked_branches(db, remote: str) -> dict[str, Tracking]:
    names = [r[0] for r in db.execute("SELECT branch FROM remote_branches WHERE remote = ?", [remote])]
    return {b: t for b in names if (t := tracking(db, remote, b)) is not None}


def set_tracking(db, refs, remote: str, branch: str, new: Tracking, expected: Tracking | None,
                 message: str) -> None:
    """Move refs/remotes/REMOTE/BRANCH (compare-and-swap) and record the Hub sha; call inside db.write."""
    refs.update(tracking_ref(remote, branch), new.kedit_commit, expected.kedit_commit if expected else None,
                message)
    db.execute("INSERT OR REPLACE INTO remote_branches (remote, branch, hub_commit, checkpoint_commit, updated) "
               "VALUES (?, ?, ?, ?, ?)", [remote, branch, new.hub_commit, new.checkpoint_commit, now_iso()])


def scrub(text: str, token: str | None) -> str:
    """`text` without the token in it: messages from the network layer are shown to users."""
    return text.replace(token, "***") if token else text
