"""push: a kedit repository shared through a Hugging Face Hub repository, and the layout there.

Layout of a Hub branch that kedit pushes (kedit branches are Hub branches):
    model-layer-NNN.safetensors, model-other.safetensors   the weights, one shard per layer, so an
    model.safetensors.index.json                            edit re-uploads only its layer's shard
    config.json, tokenizer files, README.md (model card), kedit.json (commit + every tensor's hash)
    .kedit/refs.json             {"format", "branch", "commit": the tip, "checkpoint": the commit the
                                 weights above hold (older than the tip after --history-only), "push_id"}
    .kedit/commits/<id>.json     one commit: its hashed record, tensor changes, adapter ops, files,
                                 method memory, metrics (not hashed: a later `kedit eval` re-uploads);
                                 format 2 (a merge) adds "parents", all of them in order; format 3
                                 (a batch edit's scores per request) adds "request" to every metric
    .kedit/editors/<id>.json     trained editors (MEND, InstructEdit) for a base in this history
    .kedit/probes.json           the probe suite of this history, for `kedit check` (kedit/hub/probes.py)
    .kedit/objects/ab/cd….st|.blob  every stored object the history needs that the weights above
                                 do not hold (deltas, adapters, base values of edited tensors, editors)

Calling sequence: `push` reads the remote branch's tree at the Hub commit it last saw (the
remote-tracking state), uploads what is missing and makes ONE Hub commit holding the files and
the records that name them, with `parent_commit` = that Hub commit: if anyone pushed since, the
Hub refuses it (412) and nothing is overwritten. A branch that moved to history this branch
holds (our own push killed before it recorded the Hub's answer) is pushed on from where it is.
fetch, clone and pull are in kedit/hub/fetch.py.

Error handling: nothing local changes before the Hub has answered: a failed push leaves the
repository as it was (the remote keeps at most unreferenced LFS uploads, or a new branch
created for the push).
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from kedit.core import db as dbm
from kedit.core import history, tables
from kedit.core.errors import HubError, KeditError, PushRejectedError
from kedit.core.hashing import canonical_json, record_id, tensors_object_id
from kedit.core.names import ID_RE
from kedit.core.progress import progress_bar
from kedit.core.refs import BRANCH_PREFIX, check_ref_name, short_id
from kedit.core.repo import Repository
from kedit.core.revisions import reachable
from kedit.core.store import save_tensors_atomic
from kedit.core.stwriter import StreamReader, TensorSpec
from kedit.core.tables import EDITOR_FIELDS
from kedit.hub import remotes
from kedit.hub.api import KEDIT_DIR, Hub
from kedit.model.adapters import adapter_path, mark_config, write_adapters

if TYPE_CHECKING:
    import torch

# The newest document format this kedit reads and writes. Format 2 adds `parents` (every parent,
# for a merge commit two); format 3 adds `request` to each metric (the index of the request a batch
# edit's score is about, null for a score of the whole commit), where kedit 0.1 and format 2 wrote
# the suite "request <i>" (translated on fetch). A commit's document is of the lowest format that
# expresses it: a one-parent commit without per-request scores stays format 1, byte for byte what
# kedit 0.1 wrote, so such a history reads in kedit 0.1 and nothing is re-uploaded. A document or
# refs file of a newer format than FORMAT is refused with "upgrade kedit".
FORMAT = 3
FIRST_FORMAT = 1
MERGE_FORMAT = 2
REQUEST_FORMAT = 3
REFS_FORMAT = 2  # refs.json is unchanged since format 2: older kedits read branches without per-request scores
REFS_FILE = f"{KEDIT_DIR}/refs.json"
INDEX_FILE = "model.safetensors.index.json"
GENERATED = frozenset({"README.md", "kedit.json", INDEX_FILE})  # written by push, never a stored file
UPLOADS_AT_ONCE = 3  # shards in flight to the Hub; each holds one tensor in memory
_FOREIGN_WEIGHTS = re.compile(r"^[^/]*\.(safetensors|bin|pt|pth|gguf)(\.index\.json)?$")
_LAYER_RE = re.compile(r"\.(\d+)\.")


def shard_of(tensor_name: str) -> str:
    """The checkpoint file a tensor goes to: one per layer (the first number in its name)."""
    m = _LAYER_RE.search(f".{tensor_name}.")
    return f"model-layer-{int(m.group(1)):03d}.safetensors" if m else "model-other.safetensors"


def commit_path(cid: str) -> str:
    return f"{KEDIT_DIR}/commits/{cid}.json"


def object_path(oid: str, kind: str) -> str:
    return f"{KEDIT_DIR}/objects/{oid[:2]}/{oid[2:]}.{'blob' if kind == 'blob' else 'st'}"


# -- commit documents ----------------------------------------------------------------------


def commit_document(repo: Repository, cid: str) -> dict[str, Any]:
    """Everything the database holds about one commit, as the JSON pushed to the Hub."""
    c = repo.get_commit(cid)
    changes = [{"name": ch.name, "source": ch.source_commit, "hash": ch.result_hash, "dtype": ch.dtype,
                "shape": list(ch.shape), "encoding": ch.encoding, "rank": ch.rank, "norm": ch.delta_norm,
                "rel": ch.rel_change, "stored": ch.stored_bytes,
                "steps": [[s.origin, s.object_id, s.encoding] for s in ch.steps]}
               for ch in history.changes(repo.db, cid)]
    memory = history.own_memory(repo.db, cid)
    metrics = repo.metric_rows(cid)
    per_request = any(m["request"] is not None for m in metrics)
    if not per_request:  # as formats 1 and 2 wrote them
        metrics = [{k: v for k, v in m.items() if k != "request"} for m in metrics]
    doc = {"format": FIRST_FORMAT, "id": cid, "parent": c.parent, "record": history.record(repo.db, cid),
           "method": c.method, "hparams": c.hparams, "requests": c.requests, "info": c.info, "changes": changes,
           "adapter_ops": [list(op) for op in history.adapter_op_rows(repo.db, cid)],
           "files": history.own_files(repo.db, cid),
           "metrics": metrics, "memory": {"method": memory[0], "object_id": memory[1]} if memory else None}
    if len(c.parents) > 1:
        doc.update(format=MERGE_FORMAT, parents=c.parents)
    if per_request:
        doc["format"] = REQUEST_FORMAT
    return doc


def document_parents(doc: dict[str, Any]) -> list[str]:
    """Every parent a (verified) commit document names, the first parent first."""
    return list(doc.get("parents") or ([doc["parent"]] if doc["parent"] else []))


def check_format(value: Any, what: str) -> None:
    """Refuse, with one line saying to upgrade, what a newer kedit wrote."""
    if isinstance(value, int) and not isinstance(value, bool) and value > FORMAT:
        raise HubError(f"{what} is of format {value}, newer than this kedit reads ({FORMAT}): upgrade kedit",
                       hint="pip install -U kedit")


def document_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False).encode()


def verify_document(doc: Any, expected_id: str) -> dict[str, Any]:
    """Check a downloaded commit against its id: the record must hash to it, and every row that
    the database will hold must say what the hashed record says. The metrics of a format 1 or 2
    document are translated to format 3's (`request`) in place, so the database gets one form."""
    def bad(why: str) -> HubError:
        return HubError(f"the remote commit {short_id(expected_id)} is damaged or forged: {why}; nothing was changed")

    if isinstance(doc, dict):
        check_format(doc.get("format"), f"the remote commit {short_id(expected_id)}")
    if not isinstance(doc, dict) or doc.get("format") not in range(FIRST_FORMAT, FORMAT + 1) \
            or doc.get("id") != expected_id:
        raise bad("not a kedit commit document of this format")
    try:
        return _check_document(doc, expected_id, bad)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise bad("it is missing fields or has fields of the wrong type") from None


def _check_document(doc: dict[str, Any], expected_id: str, bad) -> dict[str, Any]:
    record = json.loads(doc["record"])
    if record_id(record) != expected_id:
        raise bad("its record does not hash to its id")
    parents = record.get("parents", [])
    if doc["format"] == FIRST_FORMAT and "parents" in doc:
        raise bad("a format 1 document lists several parents")
    if parents != document_parents(doc) or doc["parent"] != (parents[0] if parents else None):
        raise bad("its parents differ from the record's")
    if record["kind"] == "edit" and (doc["method"] != record.get("method") or doc["hparams"] != record.get("hparams")
                                     or doc["requests"] != record.get("requests")):
        raise bad("its method, hyper-parameters or requests differ from the record's")

    def own(origin: str) -> str:
        return origin or expected_id

    tensors = record.get("tensors", {})
    if sorted(tensors) != sorted(ch["name"] for ch in doc["changes"]):
        raise bad("its tensor changes differ from the record's")
    for ch in doc["changes"]:
        rec = tensors[ch["name"]]
        steps = [[own(o), oid, enc] for o, oid, enc in rec["steps"]]
        if rec["source"] != ch["source"] or rec["hash"] != ch["hash"] or steps != ch["steps"]:
            raise bad(f"its change of {ch['name']} differs from the record's")
    ops = [[op, oid, kind, own(origin)] for op, oid, kind, origin in record.get("adapters", [])]
    if ops != doc["adapter_ops"] or record.get("files", {}) != doc["files"]:
        raise bad("its adapters or files differ from the record's")
    memory = doc.get("memory")
    if (memory["object_id"] if memory else None) != record.get("memory") or (
            memory and memory["method"] != (record.get("method") or "")):
        raise bad("its method memory differs from the record's")
    with_request = doc["format"] >= REQUEST_FORMAT
    if not all(_is_metric(m, with_request) for m in doc["metrics"]):
        raise bad("its metrics are malformed")
    doc["metrics"] = [m if with_request else _request_column(m) for m in doc["metrics"]]
    return record


_METRIC_TEXT = ("name", "protocol", "stage", "suite", "created")
_OLD_REQUEST_SUITE = re.compile(r"request ([0-9]+)")  # where formats 1 and 2 kept a batch edit's score of request i


def _is_metric(m: Any, with_request: bool) -> bool:
    """Metrics are not hashed into the id: check their shape before they reach the database."""
    return (isinstance(m, dict) and set(m) == {*_METRIC_TEXT, "value", *(["request"] if with_request else [])}
            and all(isinstance(m[k], str) for k in _METRIC_TEXT)
            and isinstance(m["value"], int | float) and not isinstance(m["value"], bool)
            and (m.get("request") is None or (type(m["request"]) is int and m["request"] >= 0)))


def _request_column(m: dict[str, Any]) -> dict[str, Any]:
    """A format 1 or 2 metric as format 3 has it: the suite "request i" becomes suite '' and request i
    (as migration 0009 does to a local database)."""
    old = _OLD_REQUEST_SUITE.fullmatch(m["suite"])
    return {**m, "suite": "", "request": int(old.group(1))} if old else {**m, "request": None}


def editor_path(editor_id: str) -> str:
    return f"{KEDIT_DIR}/editors/{editor_id}.json"


def editor_documents(repo: Repository, ancestors: set[str]) -> dict[str, dict[str, str]]:
    """The trained editors (MEND, InstructEdit) for a base in this history: their records."""
    rows = sorted(tables.editor_rows(repo.db), key=lambda r: r["id"])
    return {r["id"]: r for r in rows if r["base_commit"] in ancestors}


def is_editor_document(doc: Any, editor_id: str) -> bool:
    """Its weights are checked against the id when stored; here, the record's shape."""
    return (isinstance(doc, dict) and set(doc) == set(EDITOR_FIELDS) and doc["id"] == editor_id
            and all(isinstance(v, str) for v in doc.values()) and ID_RE.match(doc["base_commit"]) is not None)


def objects_of(doc: dict[str, Any]) -> set[str]:
    found = {oid for ch in doc["changes"] for _o, oid, _e in ch["steps"]}
    found |= {op[1] for op in doc["adapter_ops"]}
    if doc.get("memory"):
        found.add(doc["memory"]["object_id"])
    return found | set(doc["files"].values())


# -- what the weights on a branch hold -----------------------------------------------------


def covered_by_weights(manifest: dict[str, str], files: dict[str, str], *,
                       with_adapters: bool) -> dict[str, tuple[str, str]]:
    """Objects that the checkpoint files rebuild exactly: object id -> ("tensor", name) | ("file", path).

    A stored exact value (the base, a replacement) is the object {"value": tensor} with no
    metadata, so its id follows from the tensor's hash; config and tokenizer blobs are the files,
    except config.json when the checkpoint carries adapters: that one is marked (`mark_config`).
    """
    out: dict[str, tuple[str, str]] = {
        tensors_object_id({"value": h}, {}): ("tensor", name) for name, h in manifest.items()}
    out.update({oid: ("file", path) for path, oid in files.items()
                if path not in GENERATED and not (with_adapters and path == "config.json")})
    return out


def _local_covered(repo: Repository, commit: str | None) -> dict[str, tuple[str, str]]:
    if commit is None:
        return {}
    manifest = {n: e.hash for n, e in history.manifest(repo.db, commit).items()}
    return covered_by_weights(manifest, history.files(repo.db, commit),
                              with_adapters=bool(history.adapters(repo.db, commit)))


# -- push ----------------------------------------------------------------------------------


@dataclass
class PushResult:
    remote: str
    branch: str
    remote_branch: str
    commit: str | None
    hub_commit: str | None
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    up_to_date: bool = False


def add_file(path: str, source: Path | bytes | BinaryIO):
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=source)


def _delete(path: str):
    from huggingface_hub import CommitOperationDelete

    return CommitOperationDelete(path_in_repo=path)


def push(repo: Repository, remote_name: str | None = None, branch: str | None = None, *,
         remote_branch: str | None = None, history_only: bool = False, create: bool = False,
         base_model: str | None = None, progress: bool = False) -> PushResult:
    """Send `branch`'s history (and, unless `history_only`, its weights and card) to the remote."""
    from kedit.hub.probes import probes_ops  # (it builds on this module's layout)

    remote = remotes.get(repo.db, remote_name)
    branch = branch or repo.head_branch()
    if branch is None:
        raise KeditError("HEAD is detached: name the branch to push", hint="kedit push origin BRANCH")
    tip = repo.refs.deref(BRANCH_PREFIX + branch)
    if tip is None:
        raise KeditError(f"no branch named {branch!r}")
    rbranch = check_ref_name(remote_branch or branch, "remote branch")  # a clone makes it a branch
    hub = Hub(remote)
    if create:
        hub.create_repo()
    hub_branches = hub.branches()
    tracked = remotes.tracking(repo.db, remote.name, rbranch)
    ancestors = reachable(repo.db, [tip])  # over all parents: both sides of a merge travel
    with tempfile.TemporaryDirectory(prefix="kedit-push-") as tmp_name:
        tmp = Path(tmp_name)
        if tracked is not None:
            if rbranch not in hub_branches:
                raise HubError(f"the branch {rbranch!r} was deleted from {hub.where} since the last push",
                               hint=f"kedit remote remove {remote.name}, add it again, then push")
            base_sha, remote_tip, checkpoint = tracked.hub_commit, tracked.kedit_commit, tracked.checkpoint_commit
            if hub_branches[rbranch] != base_sha:
                base_sha, remote_tip, checkpoint = _moved_base(hub, hub_branches[rbranch], ancestors, tmp) or (
                    base_sha, remote_tip, checkpoint)  # someone else's: the Hub refuses the commit (412)
        else:
            base_sha, remote_tip, checkpoint = _untracked_base(repo, hub, hub_branches, rbranch, ancestors, tmp)
        if remote_tip is not None and remote_tip not in ancestors:
            raise PushRejectedError(f"push rejected: {remote.name}/{rbranch} has commits that {branch} does not")
        new_checkpoint = checkpoint if history_only else tip
        result = PushResult(remote.name, branch, rbranch, tip, None)
        remote_tree = hub.tree(base_sha)
        ops = _history_ops(repo, tip, new_checkpoint, remote_tree, tmp) + probes_ops(repo, ancestors, remote_tree)
        if remote_tip == tip and new_checkpoint == checkpoint and not ops:  # (new metrics make ops)
            result.up_to_date, result.hub_commit = True, base_sha
            if tracked is None or tracked.hub_commit != base_sha:  # our own push whose answer was lost
                with repo.lock(), dbm.write(repo.db):
                    remotes.set_tracking(repo.db, repo.refs, remote.name, rbranch,
                                         remotes.Tracking(tip, base_sha, checkpoint), tracked, "push: already there")
            return result
        if rbranch not in hub_branches:  # before the weights: they are uploaded to it one shard at a time
            hub.create_branch(rbranch, base_sha)
        if not history_only:
            ops += _checkpoint_ops(repo, hub, rbranch, tip, checkpoint, tmp, repo_id=remote.repo_id,
                                   base_model=base_model, progress=progress)
            if checkpoint is None:  # weights someone else put there would shadow ours in from_pretrained
                ours = {op.path_in_repo for op in ops}
                ops += [_delete(p) for p in hub.root_files(base_sha) if _FOREIGN_WEIGHTS.match(p) and p not in ours]
        # A fresh push id makes every push a real commit: were all files unchanged, huggingface_hub
        # would skip the commit, and with it the Hub's parent_commit check.
        state = {"format": REFS_FORMAT, "branch": rbranch, "commit": tip, "checkpoint": new_checkpoint,
                 "push_id": secrets.token_hex(8)}
        ops.append(add_file(REFS_FILE, canonical_json(state)))
        message = f"kedit push {short_id(tip)}: {repo.get_commit(tip).message}"[:200]
        result.hub_commit = hub.commit(ops, branch=rbranch, parent=base_sha, message=message)
    for op in ops:
        if not hasattr(op, "upload_info"):  # a deletion
            continue
        if getattr(op, "_remote_oid", None) is None or op._remote_oid != op._local_oid:
            result.files.append(op.path_in_repo)
            result.bytes += op.upload_info.size
    new = remotes.Tracking(tip, result.hub_commit, new_checkpoint)
    with repo.lock(), dbm.write(repo.db):
        remotes.set_tracking(repo.db, repo.refs, remote.name, rbranch, new, tracked, f"push: {short_id(tip)}")
    return result


def _moved_base(hub: Hub, sha: str, ancestors: set[str], tmp: Path) -> tuple[str, str, str | None] | None:
    """Where to push from when the Hub branch moved since kedit last saw it, if what is there now is
    history this branch contains (our own push killed before it recorded the answer, or commits
    fetched since); None when it is someone else's."""
    state = hub.read_json(REFS_FILE, sha, tmp)
    if state is None or state.get("commit") not in ancestors:
        return None
    return sha, state["commit"], state.get("checkpoint")


def _untracked_base(repo: Repository, hub: Hub, hub_branches: dict[str, str], rbranch: str,
                    ancestors: set[str], tmp: Path) -> tuple[str, str | None, str | None]:
    """Where a push to a branch kedit has not seen starts: (Hub sha, kedit tip, checkpoint there)."""
    if rbranch in hub_branches:
        start = hub_branches[rbranch]
    else:  # a new Hub branch: start from the tracked branch closest to ours, else the default branch
        tracked = remotes.tracked_branches(repo.db, hub.remote.name)
        related = [t for t in tracked.values() if t.kedit_commit in ancestors]
        if related:
            best = max(related, key=lambda t: repo.get_commit(t.kedit_commit).depth)
            return best.hub_commit, best.kedit_commit, best.checkpoint_commit
        if "main" not in hub_branches:
            raise HubError(f"{hub.where} has no main branch to start the branch {rbranch!r} from")
        start = hub_branches["main"]
    state = hub.read_json(REFS_FILE, start, tmp)
    if state is None:
        return start, None, None
    tip = state.get("commit")
    if rbranch in hub_branches and tip not in ancestors:
        raise PushRejectedError(f"push rejected: {hub.remote.name}/{rbranch} holds kedit history that this "
                                "branch does not contain")
    if tip not in ancestors:  # unrelated history on the start branch: upload everything
        return start, None, None
    return start, tip, state.get("checkpoint")


def _history_ops(repo: Repository, tip: str, checkpoint: str | None, remote_tree: dict[str, str],
                 tmp: Path) -> list:
    from huggingface_hub.utils.sha import git_hash

    ops, needed = [], set()
    ancestors = history.oldest_first(repo.db, reachable(repo.db, [tip]))[::-1]
    for cid in ancestors:
        doc = commit_document(repo, cid)
        needed |= objects_of(doc)
        data = document_bytes(doc)
        if remote_tree.get(commit_path(cid)) != git_hash(data):
            ops.append(add_file(commit_path(cid), data))
    for editor_id, row in editor_documents(repo, set(ancestors)).items():
        needed.add(editor_id)
        data = canonical_json(row)
        if remote_tree.get(editor_path(editor_id)) != git_hash(data):
            ops.append(add_file(editor_path(editor_id), data))
    covered = _local_covered(repo, checkpoint)
    for oid in sorted(needed - set(covered)):
        kind = repo.store.kind_of(oid)
        if kind is None:
            raise KeditError(f"object {oid} is missing from the store: nothing was pushed", hint="run 'kedit fsck'")
        path = object_path(oid, kind)
        if path in remote_tree:
            continue
        if kind == "ref":  # a --no-copy base tensor: send it as the object it stands for
            tensors, metadata = repo.store.get_tensors(oid)
            file = tmp / f"{oid}.st"
            save_tensors_atomic(file, tensors, metadata, durable=False)
            ops.append(add_file(path, file))
        else:
            ops.append(add_file(path, repo.store.path(oid, kind)))
    return ops


def _adapter_ops(repo: Repository, tip: str, old: str | None, tmp: Path) -> tuple[list, bool, list[str]]:
    """The adapter files of `tip` as `kedit export` writes them, when they differ from `old`'s.

    Returns (operations, whether the adapters changed, tip's adapter file paths). Files of `old`
    that `tip` no longer has are deleted, so a revert of the last GRACE edit leaves a plain folder.
    """
    refs = [a.object_id for a in history.adapters(repo.db, tip)]
    old_refs = [a.object_id for a in history.adapters(repo.db, old)] if old else []
    adapters = repo.adapters(tip) if refs else []
    paths = [adapter_path(i, a.kind) for i, (_, a) in enumerate(adapters)]
    if refs == old_refs:
        return [], False, paths
    written = write_adapters(tmp, [a for _, a in adapters])
    ops = [add_file(rel, tmp / rel) for rel in written]
    old_paths = [adapter_path(i, a.kind) for i, a in enumerate(history.adapters(repo.db, old))] if old else []
    ops += [_delete(p) for p in old_paths if p not in written]
    return ops, True, written


class _ThreadValues:
    """Tensor values read through the calling thread's own repository connection: an SQLite
    connection serves only the thread that opened it, and a push reads shards in worker threads.
    Each task closes its thread's connection with `close_here` when it ends."""

    def __init__(self, path: Path) -> None:
        self._path, self._local = path, threading.local()

    def value_of(self, change: history.Change) -> torch.Tensor:
        if getattr(self._local, "repo", None) is None:
            self._local.repo = Repository(self._path)
        return self._local.repo.materializer.value_of(change)

    def close_here(self) -> None:
        if getattr(self._local, "repo", None) is not None:
            self._local.repo.close()
            self._local.repo = None


def _checkpoint_ops(repo: Repository, hub: Hub, rbranch: str, tip: str, old: str | None, tmp: Path, *,
                    repo_id: str, base_model: str | None, progress: bool) -> list:
    """The shards whose tensors changed since `old` (all of them when the branch has none yet),
    the config/tokenizer files that changed, the adapters (with config.json marked, as `kedit
    export` writes it, so that plain `from_pretrained` refuses the folder), the index, kedit.json
    and the model card."""
    from kedit.hub import card

    manifest = history.manifest(repo.db, tip)
    before = history.manifest(repo.db, old) if old else {}
    groups: dict[str, list[str]] = {}
    for name in manifest:
        groups.setdefault(shard_of(name), []).append(name)
    changed = [shard for shard, names in groups.items()
               if any(name not in before or before[name].hash != manifest[name].hash for name in names)]
    changes = {n: history.change(repo.db, manifest[n].commit_id, n) for shard in changed for n in groups[shard]}
    values = _ThreadValues(repo.path)

    def hashed(shard: str):
        """The shard as an operation, its sha256 read from the shard's bytes as they are made."""
        try:
            return add_file(shard, StreamReader(
                [TensorSpec(n, manifest[n].dtype, manifest[n].shape) for n in groups[shard]],
                lambda n: values.value_of(changes[n]), {"format": "pt"}))
        finally:
            values.close_here()

    def uploaded(made: Future):
        op = made.result()
        try:
            hub.preupload([op], branch=rbranch)  # the shard goes up now (a small one waits for the commit)
        finally:
            values.close_here()
        return op

    # A shard is never on disk here: it is made once for its sha256, in a thread that runs ahead, and
    # once more to upload it. Uploads go several at once, as huggingface_hub's own upload_folder
    # sends files: the Hub's receiving and storing of one overlaps the next. Memory: one tensor held
    # by each thread.
    with ThreadPoolExecutor(1, thread_name_prefix="kedit-sha256") as ahead, \
            ThreadPoolExecutor(UPLOADS_AT_ONCE, thread_name_prefix="kedit-upload") as uploads:
        made = [ahead.submit(hashed, shard) for shard in sorted(changed)]
        sent = [uploads.submit(uploaded, future) for future in made]
        try:
            ops = [future.result() for future in progress_bar(sent, desc="shards", disable=not progress)]
        finally:
            for future in made + sent:
                future.cancel()
    files = history.files(repo.db, tip)
    old_files = history.files(repo.db, old) if old else {}
    adapter_ops, adapters_changed, adapter_files = _adapter_ops(repo, tip, old, tmp)
    ops += adapter_ops
    for path, oid in sorted(files.items()):
        if path in GENERATED or (old_files.get(path) == oid and not (path == "config.json" and adapters_changed)):
            continue
        data = repo.store.get_blob(oid)
        if path == "config.json" and adapter_files:  # plain from_pretrained must not load it without them
            data = mark_config(data, adapter_files)
        ops.append(add_file(path, data))
    index = {"metadata": {"total_size": sum(e.nbytes for e in manifest.values())},
             "weight_map": {n: shard_of(n) for n in sorted(manifest)}}
    ops.append(add_file(INDEX_FILE, json.dumps(index, indent=2).encode()))
    provenance = {"commit": tip, "tensors": {n: e.hash for n, e in manifest.items()},
                  "adapters": [a.object_id for a in history.adapters(repo.db, tip)], "adapter_files": adapter_files}
    ops.append(add_file("kedit.json", json.dumps(provenance, indent=1, sort_keys=True).encode()))
    card_text = card.render(repo, tip, repo_id=repo_id, base_model=base_model)
    ops.append(add_file("README.md", card_text.encode()))
    return ops
