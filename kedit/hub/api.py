"""The few Hub calls kedit makes, through huggingface_hub's HfApi, with errors in one line.

Every network failure (no connection, wrong or missing token, missing repository or branch, a
rejected commit) becomes a HubError whose message says what happened and what to do, without
a traceback and without the token (see `remotes.scrub`). 412 on a commit (the branch moved
since `parent_commit`) becomes PushRejectedError.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from kedit.core.errors import BadNameError, HubError, PushRejectedError
from kedit.core.names import check_hub_commit, check_hub_path
from kedit.core.progress import progress_enabled
from kedit.hub.remotes import Remote, check_transport, is_home, scrub, token_for

KEDIT_DIR = ".kedit"


class Hub:
    """One remote's repository on the Hub, with the token bound to its origin (`remotes.token_for`)."""

    def __init__(self, remote: Remote) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars

        check_transport(remote.endpoint)
        if not progress_enabled():  # not a terminal, --quiet or --json: huggingface_hub's bars too
            disable_progress_bars()
        self.remote = remote
        self.token = token_for(remote)
        # token=False, never None: with None huggingface_hub would send $HF_TOKEN to any host
        self.api = HfApi(endpoint=remote.endpoint, token=self.token or False)

    @property
    def token_hint(self) -> str:
        """How to give this remote a token, which depends on where it is."""
        if self.remote.token_env:
            return f"set ${self.remote.token_env} (the variable this remote names for its token)"
        if is_home(self.remote.endpoint):
            return "set HF_TOKEN or run 'hf auth login'"
        return ("HF_TOKEN goes only to HF_ENDPOINT's host: put this host's token in a variable the remote "
                "names (kedit remote add NAME URL --token-env VAR)")

    @property
    def where(self) -> str:
        return f"{self.remote.repo_id} at {self.remote.endpoint}"

    @contextlib.contextmanager
    def errors(self, doing: str, branch: str | None = None) -> Iterator[None]:
        """Turn huggingface_hub's and the HTTP client's exceptions into one-line HubErrors."""
        from huggingface_hub import errors as hf

        try:
            yield
        except hf.OfflineModeIsEnabled:
            raise HubError(f"cannot {doing}: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE") from None
        except hf.RepositoryNotFoundError:
            raise HubError(f"cannot {doing}: repository {self.where} not found (or the token cannot see it)",
                           hint="check the URL with 'kedit remote list'; 'kedit push --create' creates it") from None
        except hf.RevisionNotFoundError:
            what = f"branch {branch!r}" if branch else "the Hub commit kedit last saw"
            raise HubError(f"cannot {doing}: {what} does not exist in {self.where} (rewritten history?)",
                           hint="kedit fetch, then push again") from None
        except hf.HfHubHTTPError as e:
            raise self._http_error(doing, e, branch) from None
        except Exception as e:
            root = _root_cause(e)
            if _is_network(e) or _is_network(root):
                raise HubError(f"cannot {doing}: the Hub at {self.remote.endpoint} cannot be reached "
                               f"({scrub(str(root) or type(root).__name__, self.token)})",
                               hint="check the network and HF_ENDPOINT, then run the command again") from None
            if isinstance(e, ValueError | RuntimeError):
                raise HubError(f"cannot {doing}: the Hub rejected it ({scrub(_first_line(e), self.token)})") from None
            raise

    def _http_error(self, doing: str, e, branch: str | None) -> HubError:
        status = e.response.status_code if e.response is not None else None
        server = scrub(getattr(e, "server_message", None) or _first_line(e), self.token)
        if status == 412:
            return PushRejectedError(f"push rejected: the branch {branch!r} of {self.where} moved since your "
                                     f"last pull (someone else pushed)")
        if status == 401:
            if not self.token:
                return HubError(f"cannot {doing}: the Hub asks for a token and none is set", hint=self.token_hint)
            return HubError(f"cannot {doing}: the Hub refused the token (401 {server.strip()})",
                            hint=self.token_hint)
        if status == 403:
            return HubError(f"cannot {doing}: the token may not write to {self.where} (403)",
                            hint="use a token with write access")
        return HubError(f"cannot {doing}: the Hub answered {status}: {server.strip()}")

    # -- reading ---------------------------------------------------------------------------

    def branches(self) -> dict[str, str]:
        """Hub branch name -> commit sha."""
        with self.errors(f"list the branches of {self.remote.repo_id}"):
            refs = self.api.list_repo_refs(self.remote.repo_id)
        return {b.name: b.target_commit for b in refs.branches}

    def tree(self, sha: str, folder: str = KEDIT_DIR) -> dict[str, str]:
        """path -> git blob id of every file under `folder` at commit `sha` (empty if none)."""
        from huggingface_hub import errors as hf

        with self.errors(f"list {folder}/ in {self.remote.repo_id}"):
            try:
                entries = list(self.api.list_repo_tree(self.remote.repo_id, path_in_repo=folder, revision=sha,
                                                       recursive=True))
            except hf.RemoteEntryNotFoundError:
                return {}
        return {e.path: e.blob_id for e in entries if hasattr(e, "blob_id")}

    def root_files(self, sha: str) -> list[str]:
        """The files at the top of the repository at commit `sha`."""
        with self.errors(f"list the files of {self.remote.repo_id}"):
            entries = list(self.api.list_repo_tree(self.remote.repo_id, revision=sha))
        return [e.path for e in entries if hasattr(e, "blob_id")]

    def download(self, path: str, sha: str, dest: Path) -> Path:
        """`path` at `sha`, written under `dest` (both named by the remote: checked first)."""
        self._check_names(path, sha)
        with self.errors(f"download {path} from {self.remote.repo_id}"):
            return Path(self.api.hf_hub_download(self.remote.repo_id, path, revision=sha, local_dir=dest))

    @contextlib.contextmanager
    def open(self, path: str, sha: str) -> Iterator[Download]:
        """`path` at `sha` as a stream read front to back, never written here (a shard whose
        tensors are checked and stored as they arrive). Network failures while reading are
        HubErrors too."""
        from huggingface_hub import constants, get_session, hf_hub_url
        from huggingface_hub import errors as hf
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        self._check_names(path, sha)
        doing = f"download {path} from {self.remote.repo_id}"
        with contextlib.ExitStack() as stack:  # the caller's own errors pass through untouched
            with self.errors(doing):
                if constants.HF_HUB_OFFLINE:
                    raise hf.OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
                url = hf_hub_url(self.remote.repo_id, path, revision=sha, endpoint=self.remote.endpoint)
                headers = build_hf_headers(token=self.token or False)  # (False: see __init__)
                response = stack.enter_context(get_session().stream(
                    "GET", url, headers=headers, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT))
                hf_raise_for_status(response)
            yield Download(response.iter_bytes(), self, doing)

    def read_json(self, path: str, sha: str, dest: Path) -> dict | None:
        """A small JSON file at `sha`, or None when the file is not there."""
        from huggingface_hub import errors as hf

        self._check_names(path, sha)
        with self.errors(f"read {path} from {self.remote.repo_id}"):
            try:
                file = Path(self.api.hf_hub_download(self.remote.repo_id, path, revision=sha, local_dir=dest))
            except hf.RemoteEntryNotFoundError:
                return None
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise HubError(f"{path} in {self.where} is not valid JSON ({e})") from None

    def _check_names(self, path: str, sha: str) -> None:
        try:
            check_hub_path(path)
            check_hub_commit(sha)
        except BadNameError as e:
            raise HubError(f"refused {self.where}: {e}; nothing was changed") from None

    # -- writing ---------------------------------------------------------------------------

    def create_repo(self) -> None:
        with self.errors(f"create {self.remote.repo_id}"):
            self.api.create_repo(self.remote.repo_id, exist_ok=True)

    def create_branch(self, branch: str, start: str) -> None:
        with self.errors(f"create the branch {branch!r}", branch):
            self.api.create_branch(self.remote.repo_id, branch=branch, revision=start, exist_ok=False)

    def preupload(self, operations: list, *, branch: str) -> None:
        """Upload the LFS files among `operations` now, ahead of the commit that names them, so that
        each local file can be deleted at once (a push keeps one shard on disk, not the model)."""
        with self.errors(f"push to {self.remote.repo_id}", branch):
            self.api.preupload_lfs_files(self.remote.repo_id, additions=operations, revision=branch)

    def commit(self, operations: list, *, branch: str, parent: str, message: str) -> str:
        """One Hub commit on `branch`, refused by the Hub unless the branch is still at `parent`."""
        with self.errors(f"push to {self.remote.repo_id}", branch):
            info = self.api.create_commit(self.remote.repo_id, operations, commit_message=message,
                                          revision=branch, parent_commit=parent)
        return info.oid


class Download:
    """An HTTP response body read into the caller's buffers (`Hub.open`)."""

    def __init__(self, chunks: Iterator[bytes], hub: Hub, doing: str) -> None:
        self._chunks, self._hub, self._doing = chunks, hub, doing
        self._rest = memoryview(b"")

    def readinto(self, buffer) -> int:
        """Fill `buffer`; fewer bytes only at the end of the body."""
        out = memoryview(buffer).cast("B")
        done = 0
        while done < len(out):
            if not self._rest:
                with self._hub.errors(self._doing):
                    chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._rest = memoryview(chunk)
            n = min(len(self._rest), len(out) - done)
            out[done:done + n] = self._rest[:n]
            self._rest = self._rest[n:]
            done += n
        return done

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[:self.readinto(buffer)])

    def skip(self, size: int) -> int:
        """Read past `size` bytes; how many there were."""
        buffer, skipped = bytearray(min(size, 1 << 20)), 0
        while skipped < size:
            n = self.readinto(memoryview(buffer)[:min(len(buffer), size - skipped)])
            if n == 0:
                break
            skipped += n
        return skipped


def _is_network(e: BaseException) -> bool:
    """A transport failure (refused, reset, timed out, DNS), whichever HTTP library raised it."""
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "ssl", "socket") or isinstance(
        e, ConnectionError | TimeoutError)


def _root_cause(e: BaseException) -> BaseException:
    seen = 0
    while (e.__cause__ or e.__context__) is not None and seen < 10:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
