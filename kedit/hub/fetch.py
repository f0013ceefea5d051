"""fetch, clone and pull: bringing a Hub repository's kedit history here (layout: kedit/hub/layout.py).

`fetch` walks the remote's commits back to ones it knows, checks each record against its id
(`hub.verify_document`), then every name that all branches brought against kedit's grammar
(`names.check_fetched`), and the shard names of the weights' index that objects will be
read from (`_plan_objects`): one bad name refuses the fetch before anything is stored. Each
object is then checked against its hash; objects that the branch's weights hold are rebuilt
from the shards and checked the same way. The objects are stored first, then the
commits and the remote-tracking ref are recorded in one transaction, so a failure leaves at
most unreferenced objects (for `kedit gc`). `clone` is a fresh repository plus a fetch of every
kedit branch; `pull` is a fetch plus a fast-forward, or with `--rebase` a replay of the local
edits on top of the remote's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from kedit.core import db as dbm
from kedit.core import history, tables
from kedit.core.errors import (
    BadNameError,
    CorruptObjectError,
    HubError,
    KeditError,
    PushRejectedError,
    RefNameError,
    RepositoryExistsError,
)
from kedit.core.hashing import hash_bytes, tensors_object_id
from kedit.core.names import check_fetched, check_plain_name, check_tensor_name, loads_unique
from kedit.core.progress import progress_bar
from kedit.core.refs import BRANCH_PREFIX, short_id
from kedit.core.repo import REPO_DIR, HeadState, Repository, StagedChange, StagedCommit
from kedit.core.revisions import reachable
from kedit.core.store import read_safetensors
from kedit.core.stwriter import TensorSpec
from kedit.core.tensors import DTYPE_SIZES, hash_tensor
from kedit.eval.probes import add_probes
from kedit.hub import remotes
from kedit.hub.api import Download, Hub
from kedit.hub.layout import (
    ID_RE,
    INDEX_FILE,
    REFS_FILE,
    check_format,
    commit_document,
    commit_path,
    covered_by_weights,
    document_bytes,
    document_parents,
    editor_path,
    is_editor_document,
    object_path,
    objects_of,
    verify_document,
)
from kedit.hub.probes import ProbeRow, read_probes
from kedit.model.adapters import ADAPTER_DIR

MAX_HEADER = 100_000_000  # the largest safetensors header safetensors itself reads


@dataclass
class Fetched:
    branch: str
    hub_commit: str
    tip: str
    checkpoint: str | None
    new_commits: int = 0
    objects: int = 0


def fetch(repo: Repository, remote_name: str | None = None, branches: Iterable[str] | None = None,
          *, progress: bool = False) -> dict[str, Fetched]:
    """Bring the remote's commits and objects here and move its remote-tracking refs."""
    remote = remotes.get(repo.db, remote_name)
    hub = Hub(remote)
    hub_branches = hub.branches()
    wanted = list(branches) if branches is not None else sorted(hub_branches)
    missing = [b for b in wanted if b not in hub_branches]
    if missing:
        raise HubError(f"branch {missing[0]!r} does not exist in {hub.where}")
    with tempfile.TemporaryDirectory(prefix="kedit-fetch-") as tmp_name, repo.lock():
        tmp = Path(tmp_name)
        docs: dict[str, dict] = {}
        metrics: dict[str, list[dict]] = {}
        editors: dict[str, dict] = {}
        found: dict[str, Fetched] = {}
        probes: list[ProbeRow] = []
        seen: dict[str, tuple[dict[str, str], int, int]] = {}  # branch -> (tree, documents, editors) so far
        for rbranch in wanted:
            sha = hub_branches[rbranch]
            state = hub.read_json(REFS_FILE, sha, tmp / sha)
            if state is None:
                if branches is not None:
                    raise HubError(f"the branch {rbranch!r} of {hub.where} holds no kedit history")
                continue
            check_format(state.get("format"), f"{REFS_FILE} on {rbranch!r} in {hub.where}")
            tip, checkpoint = state.get("commit"), state.get("checkpoint")
            if not (isinstance(tip, str) and ID_RE.match(tip)) or not (
                    checkpoint is None or (isinstance(checkpoint, str) and ID_RE.match(checkpoint))):
                raise HubError(f"{REFS_FILE} on {rbranch!r} in {hub.where} is damaged")
            fetched = Fetched(rbranch, sha, tip, checkpoint)
            tree = hub.tree(sha)
            before = len(docs)
            _fetch_commits(repo, hub, tree, sha, tip, docs, metrics, tmp / sha)
            fetched.new_commits = len(docs) - before
            _fetch_editors(repo, hub, tree, sha, editors, tmp / sha)
            probes += read_probes(hub, tree, sha, tmp / sha)
            found[rbranch] = fetched
            seen[rbranch] = (tree, len(docs), len(editors))
        try:  # nothing is written before every name, the index's shard names included, has passed
            check_fetched(found, docs, editors)
            plans, planned, unplanned = {}, set(), set()
            for rbranch, f in found.items():  # each branch's objects, with the documents known by then
                tree, n_docs, n_editors = seen[rbranch]
                plans[rbranch] = _plan_objects(repo, hub, tree, f.hub_commit, f.checkpoint,
                                               dict(list(docs.items())[:n_docs]),
                                               set(list(editors)[:n_editors]), planned, unplanned,
                                               tmp / f.hub_commit)
            missing = sorted(unplanned - planned)
            if missing:
                raise HubError(f"the remote history is incomplete: object {missing[0]} is missing from "
                               f"{hub.where}; nothing was changed")
        except (BadNameError, RefNameError) as e:
            raise HubError(f"refused {hub.where}: {e}; nothing was changed") from None
        for rbranch, plan in plans.items():
            found[rbranch].objects = plan.count
            _store_objects(repo, hub, plan, tmp / plan.sha, progress)
        with dbm.write(repo.db):  # the probes with the commits they name, in one transaction
            _record(repo, remote.name, docs, metrics, editors, found)
            add_probes(repo, probes)
    return found


def _known(repo: Repository, cid: str) -> bool:
    return history.exists(repo.db, cid)


def _download_document(hub: Hub, tree: dict[str, str], sha: str, cid: str, tmp: Path) -> dict:
    path = commit_path(cid)
    if path not in tree:
        raise HubError(f"the remote history is incomplete: commit {short_id(cid)} is missing from {hub.where}")
    try:
        doc = loads_unique(hub.download(path, sha, tmp).read_text())
    except ValueError:
        doc = None
    verify_document(doc, cid)
    return doc


def _fetch_commits(repo: Repository, hub: Hub, tree: dict[str, str], sha: str, tip: str,
                   docs: dict[str, dict], metrics: dict[str, list[dict]], tmp: Path) -> None:
    """The remote commits missing here, tip first; and the metrics of known commits that differ
    (measurements are not part of a commit's id: a later `kedit eval` changes them)."""
    from huggingface_hub.utils.sha import git_hash

    stack, frontier = [tip], set()  # over all parents: a merge brings both sides
    while stack:
        cid = stack.pop()
        if cid in docs:
            continue
        if _known(repo, cid):
            frontier.add(cid)
            continue
        docs[cid] = _download_document(hub, tree, sha, cid, tmp)
        stack.extend(document_parents(docs[cid]))
    for known in history.oldest_first(repo.db, reachable(repo.db, frontier))[::-1]:
        remote_blob = tree.get(commit_path(known))
        if remote_blob is None or known in metrics:
            continue
        if git_hash(document_bytes(commit_document(repo, known))) != remote_blob:
            metrics[known] = _download_document(hub, tree, sha, known, tmp)["metrics"]


def _state_at(repo: Repository, docs: dict[str, dict], commit: str) -> tuple[dict[str, str], dict[str, str]]:
    """Tensor hashes and files at `commit`, from the fetched documents and the local history."""
    manifest: dict[str, str] = {}
    files: dict[str, str] = {}
    cid: str | None = commit
    while cid in docs:
        for ch in docs[cid]["changes"]:
            manifest.setdefault(ch["name"], ch["hash"])
        for path, oid in docs[cid]["files"].items():
            files.setdefault(path, oid)
        cid = docs[cid]["parent"]
    if cid is not None:
        for name, entry in history.manifest(repo.db, cid).items():
            manifest.setdefault(name, entry.hash)
        for path, oid in history.files(repo.db, cid).items():
            files.setdefault(path, oid)
    return manifest, files


def _fetch_editors(repo: Repository, hub: Hub, tree: dict[str, str], sha: str, editors: dict[str, dict],
                   tmp: Path) -> None:
    """Records of trained editors not known here (their weights come with the objects)."""
    prefix = editor_path("")[:-len(".json")]
    for path in sorted(p for p in tree if p.startswith(prefix) and p.endswith(".json")):
        editor_id = path[len(prefix):-len(".json")]
        if editor_id in editors or tables.has_editor(repo.db, editor_id):
            continue
        try:
            doc = json.loads(hub.download(path, sha, tmp).read_text())
        except ValueError:
            doc = None
        if not is_editor_document(doc, editor_id):
            raise HubError(f"the remote editor record {short_id(editor_id)} is damaged; nothing was changed")
        editors[editor_id] = doc


@dataclass
class _ObjectPlan:
    """Where each object a branch needs comes from, decided before anything is stored."""
    sha: str
    files: list[tuple[str, str, bool]]  # (object id, Hub path, is a blob)
    from_weights: dict[str, list[tuple[str, str]]]  # shard -> [(object id, tensor name)]
    manifest: dict[str, str]  # tensor name -> hash, at the branch's checkpoint

    @property
    def count(self) -> int:
        return len(self.files) + sum(len(v) for v in self.from_weights.values())


def _plan_objects(repo: Repository, hub: Hub, tree: dict[str, str], sha: str, checkpoint: str | None,
                  docs: dict[str, dict], extra: set[str], planned: set[str], unplanned: set[str],
                  tmp: Path) -> _ObjectPlan:
    """The objects missing here and not `planned` for an earlier branch, and the Hub file each
    comes from (adding them to `planned`); those this branch cannot give go to `unplanned`, for a
    later branch to give. The index's shard names are checked here, so that a hostile one refuses
    the fetch before any object is stored."""
    wanted = extra | {oid for doc in docs.values() for oid in objects_of(doc)}
    plan = _ObjectPlan(sha, [], {}, {})
    covered: dict[str, tuple[str, str]] = {}
    if checkpoint is not None:
        plan.manifest, files = _state_at(repo, docs, checkpoint)
        config = files.get("config.json")  # asked about only when needed: one more request
        marked = config in wanted - planned and not repo.store.has(config) and bool(hub.tree(sha, ADAPTER_DIR))
        covered = covered_by_weights(plan.manifest, files, with_adapters=marked)
    weight_map: dict[str, str] | None = None
    for oid in sorted(oid for oid in wanted - planned if not repo.store.has(oid)):
        st, blob = object_path(oid, "st"), object_path(oid, "blob")
        if oid not in covered and st not in tree and blob not in tree:
            unplanned.add(oid)
            continue
        planned.add(oid)
        if st in tree or blob in tree:
            plan.files.append((oid, st if st in tree else blob, st not in tree))
        elif covered[oid][0] == "file":
            plan.files.append((oid, covered[oid][1], True))
        else:
            if weight_map is None:
                weight_map = _weight_map(hub, sha, tmp)
            name = covered[oid][1]
            shard = weight_map.get(name)
            if shard is None:
                raise HubError(f"the remote weights do not hold {name}, which the history needs; "
                               "nothing was changed")
            plan.from_weights.setdefault(shard, []).append((oid, name))
    return plan


def _weight_map(hub: Hub, sha: str, tmp: Path) -> dict[str, str]:
    """The remote index's tensor -> shard map, every name checked (a shard is a plain file name)."""
    index = hub.read_json(INDEX_FILE, sha, tmp) or {}
    weight_map = index.get("weight_map", {}) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise HubError(f"{INDEX_FILE} in {hub.where} is damaged")
    for name, shard in weight_map.items():
        check_tensor_name(name)
        check_plain_name(shard, "shard name")
    return weight_map


def _store_objects(repo: Repository, hub: Hub, plan: _ObjectPlan, tmp: Path, progress: bool) -> None:
    """Download, verify and store the planned objects, one file at a time: each download is
    deleted once its tensors are stored; a shard is read as it arrives, one tensor at a time."""
    with repo.store.batch():
        for oid, path, is_blob in progress_bar(plan.files, desc="objects", disable=not progress):
            file = hub.download(path, plan.sha, tmp)
            _put_verified(repo, oid, file, is_blob)
            file.unlink()
        for shard, wanted in sorted(plan.from_weights.items()):
            with hub.open(shard, plan.sha) as body:
                _store_from_shard(repo, body, shard, dict((name, oid) for oid, name in wanted), plan.manifest)


def _store_from_shard(repo: Repository, body: Download, shard: str, wanted: dict[str, str],
                      manifest: dict[str, str]) -> None:
    """The `wanted` tensors (name -> object id) of a safetensors shard read as it downloads, each
    checked against its hash in `manifest` as it is written into its object (kept only if it
    matches): a buffer of 1 MB is held, and the shard is never written here."""
    def corrupt(name: str | None, why: str) -> CorruptObjectError:
        oid = wanted[name] if name else next(iter(wanted.values()))
        what = f"{name} in the downloaded {shard}" if name else f"the downloaded {shard}"
        return CorruptObjectError(oid, f"{what} {why}; nothing was changed")

    size = int.from_bytes(body.read(8).ljust(8, b"\0"), "little")
    try:
        if not 2 <= size <= MAX_HEADER:
            raise ValueError(f"header size {size}")
        header = loads_unique(body.read(size).decode())
        entries = sorted(((e["data_offsets"][0], e["data_offsets"][1], name, e["dtype"], tuple(e["shape"]))
                          for name, e in header.items() if name != "__metadata__"))
        if not all(isinstance(d, int) and d >= 0 for start, end, _, _, shape in entries for d in (start, end, *shape)):
            raise ValueError("an offset or a shape is not a list of sizes")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise corrupt(None, f"is not a safetensors file ({e})") from None
    at = 0
    for start, end, name, dtype, shape in entries:
        if name not in wanted:
            continue
        if dtype not in DTYPE_SIZES or start < at or end - start != TensorSpec(name, dtype, shape).nbytes:
            raise corrupt(name, "does not match its hash")
        if body.skip(start - at) != start - at:
            raise corrupt(name, "is cut short")
        at = end
        try:
            repo.store.put_streamed_tensor(dtype, shape, body.readinto, manifest[name])
        except ValueError as e:  # cut short, or not the bytes its hash names: not stored
            raise corrupt(name, str(e)) from None
        del wanted[name]
    if wanted:
        raise corrupt(next(iter(wanted)), "does not match its hash")


def _put_verified(repo: Repository, oid: str, file: Path, is_blob: bool) -> None:
    """Store a downloaded object only if its content hashes to its id."""
    if is_blob:
        data = file.read_bytes()
        if hash_bytes(data) != oid:
            raise CorruptObjectError(oid, "the downloaded content does not match its id; nothing was changed")
        repo.store.put_blob(data)
        return
    try:
        tensors, metadata = read_safetensors(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptObjectError(oid, f"the download is not a safetensors file ({e})") from None
    hashes = {n: hash_tensor(t) for n, t in tensors.items()}
    if tensors_object_id(hashes, metadata) != oid:
        raise CorruptObjectError(oid, "the downloaded content does not match its id; nothing was changed")
    repo.store.put_tensors(tensors, metadata, tensor_hashes=hashes)


def _record(repo: Repository, remote: str, docs: dict[str, dict], metrics: dict[str, list[dict]],
            editors: dict[str, dict], found: dict[str, Fetched]) -> None:
    """Insert the fetched commits (with the parents their records name) and their metrics,
    update known commits' metrics, and move the remote-tracking refs, atomically."""
    with dbm.write(repo.db):
        repo.write_commits([_staged(cid, doc) for cid, doc in docs.items()])
        repo.record_fetched_metrics({cid: doc["metrics"] for cid, doc in docs.items()}, remote)
        for doc in editors.values():
            tables.insert_editor(repo.db, doc)
        repo.record_fetched_metrics(metrics, remote)
        for f in found.values():
            old = remotes.tracking(repo.db, remote, f.branch)
            new = remotes.Tracking(f.tip, f.hub_commit, f.checkpoint)
            if old != new:
                remotes.set_tracking(repo.db, repo.refs, remote, f.branch, new, old, f"fetch: {short_id(f.tip)}")


def _staged(cid: str, doc: dict) -> StagedCommit:
    """A fetched commit document (checked against its id by `verify_document`) as a staged commit."""
    memory = doc.get("memory")
    return StagedCommit(
        cid, doc["parent"], json.loads(doc["record"]), doc["method"], doc["hparams"], doc["requests"], doc["info"],
        changes=[StagedChange(ch["name"], ch["source"], ch["hash"], ch["dtype"], ch["shape"], ch["encoding"],
                              ch["rank"], ch["norm"], ch["rel"], ch["stored"], [tuple(s) for s in ch["steps"]])
                 for ch in doc["changes"]],
        adapter_ops=[tuple(op) for op in doc["adapter_ops"]], files=dict(doc["files"]),
        memory=(memory["method"], memory["object_id"]) if memory else None)


# -- clone and pull ------------------------------------------------------------------------


def clone(url: str, directory: Path | None = None, *, token_env: str | None = None, worktree: bool = True,
          progress: bool = False) -> tuple[Repository, dict]:
    """A new repository at `directory` holding every kedit branch of the Hub repository `url`
    (its remote `origin` takes its token from $`token_env` when given). Without `worktree` (a bare
    clone) the weights are written once, to the store, and no working model is made."""
    endpoint, repo_id = remotes.parse_url(url)
    remotes.check_transport(endpoint)  # refused before any folder is made
    remotes.check_token_env(token_env)
    directory = directory or Path(repo_id.split("/")[-1])
    path = directory / REPO_DIR
    made_dir = not directory.exists()
    try:
        repo = Repository.create(path, worktree=worktree)  # clears what an interrupted clone or init left there
        remotes.add(repo.db, "origin", url, token_env)
        found = fetch(repo, "origin", progress=progress)
        if not found:
            raise HubError(f"{url} holds no kedit history", hint="push to it first with 'kedit push'")
        default = "main" if "main" in found else sorted(found)[0]
        with repo.lock():
            repo.finish_init({f.branch: f.tip for f in found.values()}, default, f"clone: from {url}",
                             progress=progress)
    except RepositoryExistsError:
        raise
    except BaseException:
        shutil.rmtree(directory if made_dir else path, ignore_errors=True)
        raise
    return repo, found


@dataclass
class PullResult:
    remote: str
    branch: str
    old: str
    new: str
    fetched: int
    status: str  # up-to-date | fast-forward | ahead | rebased


def pull(repo: Repository, remote_name: str | None = None, remote_branch: str | None = None, *,
         rebase: bool = False, progress: bool = False) -> PullResult:
    """Fetch the remote branch and fast-forward the current branch to it; with `rebase`, a
    branch that diverged has its own edits replayed on top of the remote's."""
    branch = repo.head_branch()
    if branch is None:
        raise KeditError("HEAD is detached: check out the branch to pull into", hint="kedit checkout main")
    remote = remotes.get(repo.db, remote_name)
    rbranch = remote_branch or branch
    found = fetch(repo, remote.name, [rbranch], progress=progress)[rbranch]
    local = repo.refs.deref(BRANCH_PREFIX + branch)
    result = PullResult(remote.name, branch, local, found.tip, found.new_commits, "up-to-date")
    if local == found.tip:
        return result
    if found.tip in reachable(repo.db, [local]):
        result.status, result.new = "ahead", local
        return result
    remote_history = reachable(repo.db, [found.tip])
    mine = history.oldest_first(repo.db, reachable(repo.db, [local]) - remote_history)
    if local not in remote_history and not rebase:
        raise PushRejectedError(
            f"{branch} and {remote.name}/{rbranch} have diverged ({len(mine)} local commit(s) not on the "
            "remote); the remote commits were fetched", hint="kedit pull --rebase replays yours on top of them")
    if local not in remote_history:
        refused = [c for c in mine if repo.get_commit(c).kind != "edit"]
        if refused:
            raise KeditError(f"cannot rebase {short_id(refused[0])}: only edit commits can be replayed; "
                             "nothing was changed")
    # Decided on what was read above: the move is a compare-and-swap from there.
    repo.reset(found.tip, expected=HeadState(branch, local), message=f"pull: fast-forward to {short_id(found.tip)}")
    result.status = "fast-forward"
    if local not in remote_history:
        result.new, result.status = _replay(repo, mine, HeadState(branch, found.tip), restore=local), "rebased"
    return result


def _replay(repo: Repository, commits: list[str], at: HeadState, *, restore: str) -> str:
    """Re-commit each edit's own deltas and adapters, oldest first, on top of `at` (a rebase:
    `Repository.cherry_pick` of each, the code `kedit cherry-pick` runs).

    The deltas are the stored ones, applied to the new parent; metrics measured on the old
    parent are not copied (the info says where the commit came from: re-evaluate it). If any
    replay fails, the branch goes back to `restore` and the error is raised.
    """
    try:
        for cid in commits:
            made = repo.cherry_pick(cid, expected_parent=at, note="rebased_from", record_origin=False)
            at = HeadState(at.branch, made.id)
    except BaseException:
        repo.reset(restore, force=True)
        raise
    return repo.head()
