"""Remotes: named Hugging Face Hub repositories, and what kedit last saw of their branches.

A remote is a name and a URL: `hf://OWNER/REPO` (the endpoint comes from $HF_ENDPOINT, else
huggingface.co) or `https://HOST[:PORT]/OWNER/REPO` (the endpoint is the URL's own). They live
in the history database (migration 0004_remotes) because a fetch must record, in the same
transaction as the commits it brings, where the remote branch was: the remote-tracking ref
`refs/remotes/NAME/BRANCH` (a kedit commit, kept alive by gc like any ref) and the Hub commit
sha, which is the `parent_commit` of the next push.

The token goes only to its origin (`token_for`): the token of huggingface_hub ($HF_TOKEN, then
the login cache) only to the scheme, host and port of $HF_ENDPOINT (else huggingface.co); a
remote elsewhere gets a token only from the environment variable it names (`--token-env`: the
variable's name is stored, never the token). Plain http is refused except to this machine
(`check_transport`), and `scrub` removes the token from any text that might be shown.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from kedit.core import db as dbm
from kedit.core import tables
from kedit.core.errors import RemoteError
from kedit.core.refs import check_ref_name

DEFAULT_ENDPOINT = "https://huggingface.co"
REMOTE_PREFIX = "refs/remotes/"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")  # upper case: a token (hf_...) is refused
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint: str
    repo_id: str
    token_env: str | None = None  # the environment variable holding this remote's token


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
        endpoint = home_endpoint()
    elif parts.scheme in ("http", "https") and parts.netloc:
        repo_id = parts.path.strip("/")
        endpoint = f"{parts.scheme}://{parts.netloc}"
    else:
        raise RemoteError(f"{url!r} is not a Hub URL", hint="use hf://OWNER/REPO or https://HOST/OWNER/REPO")
    repo_id = repo_id.removeprefix("models/")
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id:
        raise RemoteError(f"{url!r} does not name a repository as OWNER/REPO")
    return endpoint, repo_id


def home_endpoint() -> str:
    """The Hub that huggingface_hub's own token is for: $HF_ENDPOINT, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number: matches nothing
        port = -1
    return parts.scheme, (parts.hostname or ""), port


def check_transport(endpoint: str) -> None:
    """Refuse plain http except to this machine: a token (and the weights) would cross the network in clear."""
    scheme, host, _port = _origin(endpoint)
    if scheme == "http" and not _is_loopback(host):
        raise RemoteError(f"{endpoint} is plain http: kedit speaks http only to this machine "
                          "(127.0.0.0/8, ::1, localhost)", hint="use https://")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_home(endpoint: str) -> bool:
    """Whether `endpoint` has the origin (scheme, host, port) of the Hub huggingface_hub's token is for."""
    return _origin(endpoint) == _origin(home_endpoint())


def token_for(remote: Remote) -> str | None:
    """The token to send to `remote`, bound to its origin (see the module docstring)."""
    if remote.token_env:
        return os.environ.get(remote.token_env) or None
    if not is_home(remote.endpoint):
        return None
    from huggingface_hub import get_token

    return get_token()


def check_token_env(name: str | None) -> str | None:
    if name is not None and not _ENV_NAME_RE.match(name):
        # not echoed: it may be the token itself, given by mistake
        raise RemoteError("--token-env takes the NAME of an environment variable (upper case, digits and '_')",
                          hint="e.g. --token-env OTHER_HUB_TOKEN, with the token in $OTHER_HUB_TOKEN")
    return name


def add(db, name: str, url: str, token_env: str | None = None) -> Remote:
    check_ref_name(name, "remote")
    if "/" in name:
        raise RemoteError(f"invalid remote name {name!r}: it may not contain '/'")
    endpoint, repo_id = parse_url(url)
    check_transport(endpoint)
    check_token_env(token_env)
    with dbm.write(db):
        if tables.remote_row(db, name):
            raise RemoteError(f"a remote named {name!r} already exists", hint=f"kedit remote remove {name}")
        tables.insert_remote(db, name, url, token_env)
    return Remote(name, url, endpoint, repo_id, token_env)


def get(db, name: str | None) -> Remote:
    """The remote `name`, or when None the only one there is (or 'origin')."""
    if name is None:
        names = tables.remote_names(db)
        if not names:
            raise RemoteError("this repository has no remote", hint="kedit remote add origin hf://OWNER/REPO")
        name = "origin" if "origin" in names or len(names) != 1 else names[0]
    row = tables.remote_row(db, name)
    if row is None:
        raise RemoteError(f"no remote named {name!r}", hint="kedit remote list")
    endpoint, repo_id = parse_url(row[0])
    return Remote(name, row[0], endpoint, repo_id, row[1])


def list_all(db) -> list[Remote]:
    return [get(db, name) for name in tables.remote_names(db)]


def remove(db, name: str) -> None:
    with dbm.write(db):
        if not tables.remote_row(db, name):
            raise RemoteError(f"no remote named {name!r}", hint="kedit remote list")
        tables.delete_remote(db, name, f"{REMOTE_PREFIX}{name}/")


def tracking_ref(remote: str, branch: str) -> str:
    return f"{REMOTE_PREFIX}{remote}/{branch}"


def tracking(db, remote: str, branch: str) -> Tracking | None:
    row = tables.remote_branch_row(db, remote, branch, tracking_ref(remote, branch))
    return Tracking(*row) if row else None


def tracked_branches(db, remote: str) -> dict[str, Tracking]:
    return {b: t for b in tables.remote_branch_names(db, remote) if (t := tracking(db, remote, b)) is not None}


def set_tracking(db, refs, remote: str, branch: str, new: Tracking, expected: Tracking | None,
                 message: str) -> None:
    """Move refs/remotes/REMOTE/BRANCH (compare-and-swap) and record the Hub sha; call inside db.write."""
    refs.update(tracking_ref(remote, branch), new.kedit_commit, expected.kedit_commit if expected else None,
                message)
    tables.put_remote_branch(db, remote, branch, new.hub_commit, new.checkpoint_commit)


def scrub(text: str, token: str | None) -> str:
    """`text` without the token in it: messages from the network layer are shown to users."""
    return text.replace(token, "***") if token else text
