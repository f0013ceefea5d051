"""The repository: a base checkpoint and the history of edits made to it.

Calling sequence:
    repo = Repository.init(path, "path/to/model")      # or Repository.open(path)
    info = repo.commit({"model.layers.5.mlp.down_proj.weight": LowRank(a, b)}, message=...)
    state = repo.materialize("HEAD~1")                   # {name: tensor}, verified by hash
    repo.revert(info.id); repo.checkout("main"); repo.log()
    repo.merge("experiment"); repo.cherry_pick("experiment~1")   # stored deltas composed, no model

Error handling: every write takes the writer lock (`.kedit/LOCK`, an fcntl lock the OS
releases if the process dies), writes objects first, then records the commit and moves the
ref in one SQLite transaction with a compare-and-swap on the ref. A crash at any point leaves
either the old state or the new one, plus at most some unreferenced objects for `kedit gc`.
Every commit row is written by `write_commits` (edit, revert, the base and Hub fetch alike);
given `expected_parent` (the `HeadState` an edit's model was loaded at), it refuses to commit
when HEAD moved meanwhile. `init` marks the repository as initialising until the transaction
that records its branches, so an interrupted init is recognised (and cleared by the next one).

Caveats: a merge commit has two parents; values, logs of one line and manifests follow first
parents (the merge commit records every tensor its other side changed). The working model under
`.kedit/worktree` follows HEAD; commands that write bring it up to date first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

import kedit
from kedit.core import config, history, tables
from kedit.core import db as dbm
from kedit.core.conflicts import (
    DEFAULT_THRESHOLD,
    AdapterCheck,
    Conflict,
    Resolution,
    adapter_conflicts,
    delta_conflict,
    request_conflicts,
    with_subjects,
)
from kedit.core.conflicts import resolve as resolve_conflicts
from kedit.core.db import DB_FILE, REPO_DIR, find_repository
from kedit.core.delta import Adapter, LowRank, Replace, WeightDelta, apply_step, change_size, encode_delta
from kedit.core.errors import (
    BadNameError,
    DeltaError,
    HeadMovedError,
    IncompleteRepositoryError,
    KeditError,
    LockedError,
    MergeConflictError,
    ModelSourceError,
    ReadOnlyRepositoryError,
    RepositoryExistsError,
    RevisionError,
    WorktreeDirtyError,
)
from kedit.core.hashing import canonical_json, record_id
from kedit.core.materialize import Materializer, TensorCache, load_step
from kedit.core.names import check_tensor_name
from kedit.core.progress import progress_bar
from kedit.core.refs import BRANCH_PREFIX, DEFAULT_BRANCH, HEAD, TAG_PREFIX, Refs, check_ref_name, now_iso, short_id
from kedit.core.revisions import merge_base, reachable
from kedit.core.sources import open_source
from kedit.core.store import ObjectStore, read_safetensors
from kedit.core.tensors import dtype_name, finite, hash_tensor, jsonable, require_finite
from kedit.core.worktree import Worktree

if TYPE_CHECKING:
    import torch

LOCK_FILE = "LOCK"
DEFAULT_LOCK_TIMEOUT_S = 10.0
INITIALISING = "initialising"  # meta key present from the first write of init (or clone) until the base is recorded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    protocol: str
    stage: str = "post"  # pre | post | eval
    suite: str = ""
    source: str = field(default="", compare=False)  # the remote it was fetched from; '' = measured here
    request: int | None = None  # a batch edit's score of its request with this index; None: of the whole commit


@dataclass
class CommitInfo:
    id: str
    parent: str | None
    depth: int
    kind: str
    method: str | None
    hparams: dict[str, Any]
    requests: list[dict[str, Any]]
    info: dict[str, Any]
    message: str
    author: str
    created: str
    metrics: list[Metric] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)  # all of them, the first parent first (two for a merge)

    @property
    def short(self) -> str:
        return short_id(self.id)


@dataclass(frozen=True)
class HeadState:
    """Where HEAD is: the branch it is on (None when detached) and the commit it points to."""

    branch: str | None
    commit: str

    def __str__(self) -> str:
        return f"{self.branch} at {short_id(self.commit)}" if self.branch else f"detached {short_id(self.commit)}"


@dataclass(frozen=True)
class StagedChange:
    """A tensor change ready to be recorded: the rows `tensor_changes` and `tensor_steps` hold."""

    name: str
    source: str | None  # whose value the steps start from
    hash: str
    dtype: str
    shape: list[int]
    encoding: str
    rank: int | None
    norm: float | None
    rel: float | None
    stored: int
    steps: list[tuple[str, str, str]]  # (origin commit, object id, encoding)


@dataclass
class StagedCommit:
    """A commit ready to be recorded: its hashed record and the rows derived from it.

    Its objects are already in the store; `Repository.write_commits` records it.
    """

    id: str
    parent: str | None
    record: dict[str, Any]
    method: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    changes: list[StagedChange] = field(default_factory=list)
    adapter_ops: list[tuple[str, str, str, str]] = field(default_factory=list)  # (op, object, kind, origin)
    files: dict[str, str] = field(default_factory=dict)
    memory: tuple[str, str] | None = None  # (method, object id)
    metrics: list[Metric] = field(default_factory=list)
    probes: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, prompt, answer) it holds

    @property
    def parents(self) -> list[str]:
        """Every parent the hashed record names, the first parent (`parent`) first."""
        return list(self.record.get("parents") or ([self.parent] if self.parent else []))


@dataclass
class MergeResult:
    """What `Repository.merge` did: `head` is where HEAD is now."""

    status: str  # up-to-date | fast-forward | merged
    head: str
    ours: str
    theirs: str
    base: str | None
    conflicts: list[Conflict] = field(default_factory=list)  # resolved by `take` / `take_subjects`
    left_out: list[str] = field(default_factory=list)  # the conflicting commits the resolution left out
    tensors: int = 0
    adapter_ops: int = 0
    # (side, subject) each of `conflicts` took, in order: the subject of the --take SUBJECT=side
    # that chose it, or None where a plain --take ours|theirs did
    took: list[tuple[str, str | None]] = field(default_factory=list)

    def conflict_dicts(self) -> list[dict[str, Any]]:
        """`conflicts` as JSON objects, each with the side it took (`took`) and the subject that said so (`by`)."""
        return Resolution(self.conflicts, self.took, set(self.left_out)).to_dicts()


@dataclass
class _MergePlan:
    ours: list[str]
    theirs: list[str]
    conflicts: list[Conflict] = field(default_factory=list)
    took: list[tuple[str, str | None]] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)
    staged: dict[str, dict] = field(default_factory=dict)
    adapter_ops: list[tuple[str, str, str, str]] = field(default_factory=list)


def _finished(meta_keys: Iterable[str]) -> bool:
    """Whether init finished, from the keys of `meta` (repositories older than the initialising
    mark have `created_by` and no mark; a database killed before its first row has neither)."""
    keys = set(meta_keys)
    return "created_by" in keys and INITIALISING not in keys


def _initialised(path: Path) -> bool:
    """Whether `path` holds a repository whose init finished."""
    if not (path / DB_FILE).exists():
        return False
    db = dbm.connect(path / DB_FILE)
    try:
        return _finished(row[0] for row in db.execute("SELECT key FROM meta"))
    finally:
        db.conn.close()


@contextlib.contextmanager
def _writer_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold `path`'s writer lock; wait up to `timeout` s ($KEDIT_LOCK_TIMEOUT) for another writer."""
    if timeout is None:
        timeout = float(os.environ.get("KEDIT_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
    from filelock import FileLock, Timeout  # here: only writers lock; the import takes ~15 ms of every command

    lock = FileLock(path / LOCK_FILE, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"another kedit command is writing to {path} (waited {timeout:g} s)") from None
    try:
        yield
    finally:
        lock.release()


def _clear(path: Path) -> None:
    """Remove what an interrupted init left in `path`, keeping the lock file the caller holds."""
    for entry in path.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def repository_dir(where: str | Path | None) -> Path:
    """The `.kedit` folder a new repository at `where` (or $KEDIT_DIR, or the current folder) gets."""
    where = Path(where or os.environ.get("KEDIT_DIR") or Path.cwd()).resolve()  # relative paths break on a chdir
    return where if where.name == REPO_DIR else where / REPO_DIR


class Repository:
    def __init__(self, path: Path) -> None:
        self.path = path = Path(path).absolute()  # the store joins names onto it: a relative one would nest
        self.db = dbm.connect(path / DB_FILE)
        self.read_only = self.db.read_only
        self.store = ObjectStore(path / "objects")
        self.cache = TensorCache(path / "cache", writable=not self.read_only)
        self.refs = Refs(self.db)
        self.worktree: Worktree | None = None
        if self.config.get("worktree", "1") == "1":
            self.worktree = Worktree(path / "worktree", path / "worktree.json")
        lookups = (self.worktree.lookup,) if self.worktree else ()
        self.materializer = Materializer(self.db, self.store, self.cache, lookups)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, where: str | Path | None = None) -> Repository:
        """Open the repository at `where` (or $KEDIT_DIR, or the current directory and its parents)."""
        where = where or os.environ.get("KEDIT_DIR") or Path.cwd()
        repo = cls(find_repository(Path(where)))
        if repo.initialising:
            repo.db.conn.close()
            raise IncompleteRepositoryError(repo.path)
        return repo

    @classmethod
    def init(cls, where: str | Path | None, source: str | None = None, *, copy: bool = True,
             worktree: bool = True, dtype: torch.dtype | None = None, progress: bool = True,
             message: str | None = None) -> Repository:
        """Create a repository at `where`/.kedit holding `source` (default: the embedded SmolLM2).

        An interrupted init (or clone) left there is cleared first: the repository is marked
        initialising until the base is recorded, and nothing outside it refers to it.
        """
        path = repository_dir(where)
        if _initialised(path):  # before reading the source, which can take a while
            raise RepositoryExistsError(f"a kedit repository already exists at {path}")
        with open_source(source) as src:
            if not copy and not src.can_reference:
                raise KeditError("--no-copy needs safetensors weights; a GGUF file is dequantised at init "
                                 "and its tensors must be stored")
            path.mkdir(parents=True, exist_ok=True)
            with _writer_lock(path):  # held throughout: a second init waits, then finds this one done
                repo = cls.create(path, worktree=worktree)
                try:
                    repo._commit_base(src, copy=copy, dtype=dtype, progress=progress, message=message)
                except BaseException:
                    # Nothing refers to a half-made repository: remove it so init can be re-run.
                    repo.db.conn.close()
                    shutil.rmtree(path, ignore_errors=True)
                    raise
        return repo

    @classmethod
    def create(cls, path: Path, *, worktree: bool = True) -> Repository:
        """An empty repository at `path` (a `.kedit` folder), marked initialising until
        `finish_init` gives it its branches; what an interrupted init left there is cleared.
        The caller holds `path`'s writer lock or is the only one to know `path`."""
        if _initialised(path):
            raise RepositoryExistsError(f"a kedit repository already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        if any(entry.name != LOCK_FILE for entry in path.iterdir()):
            log.info("clearing what an interrupted init left in %s", path)
            _clear(path)
        db = dbm.connect(path / DB_FILE, create=True)
        with dbm.write(db):
            db["meta"].insert_all([{"key": INITIALISING, "value": "1"},
                                   {"key": "worktree", "value": "1" if worktree else "0"},
                                   {"key": "created_by", "value": f"kedit {kedit.__version__}"}])
        db.conn.close()
        ObjectStore(path / "objects").create()
        return cls(path)

    def finish_init(self, branches: Mapping[str, str], default: str, message: str, *,
                    progress: bool = False) -> None:
        """Give a new repository its branches and HEAD and clear its initialising mark, in one
        transaction; then bring the working model to HEAD. Before this, commands refuse it."""
        with dbm.write(self.db):
            for name, commit_id in branches.items():
                self.refs.create(BRANCH_PREFIX + name, commit_id, message)
            self.refs.update(HEAD, BRANCH_PREFIX + default, None, message, symbolic=True)
            self.refs.log(HEAD, None, branches[default], message)
            self.db.execute("DELETE FROM meta WHERE key = ?", [INITIALISING])
        self._sync_worktree(progress=progress)

    @property
    def initialising(self) -> bool:
        """True until init (or clone) has recorded the repository's branches."""
        return not _finished(self.config)

    @property
    def config(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.db.execute("SELECT key, value FROM meta")}

    @property
    def root(self) -> Path:
        """The directory that holds `.kedit`."""
        return self.path.parent

    def close(self) -> None:
        """Close the database connection now (a server that opens the repository per request)."""
        self.db.conn.close()

    def require_writable(self) -> None:
        """Refuse a writing command up front on a repository this user may only read."""
        if self.read_only:
            raise ReadOnlyRepositoryError(f"the repository at {self.path} is read-only for this user: "
                                          "this command writes to it")

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the writer lock; wait up to `timeout` s ($KEDIT_LOCK_TIMEOUT) for another writer."""
        self.require_writable()
        with _writer_lock(self.path, timeout):
            yield

    # -- reading ---------------------------------------------------------------------------

    def head(self) -> str | None:
        return self.refs.deref(HEAD)

    def head_branch(self) -> str | None:
        return self.refs.head_branch()

    def resolve(self, rev: str) -> str:
        return self.refs.resolve(rev)

    def get_commit(self, commit_id: str) -> CommitInfo:
        row = dbm.one(self.db, """SELECT id, parent, depth, kind, method, hparams, requests, info, message,
                                         author, created FROM commits WHERE id = ?""", [commit_id])
        if row is None:
            raise RevisionError(f"unknown commit {commit_id}", rev=commit_id)
        cid, parent, depth, kind, method, hp, reqs, info, message, author, created = row
        return CommitInfo(cid, parent, depth, kind, method, json.loads(hp or "{}"), json.loads(reqs or "[]"),
                          json.loads(info or "{}"), message, author, created, self.metrics(cid),
                          history.parents(self.db, cid))

    def metrics(self, commit_id: str) -> list[Metric]:
        return dbm.rows(self.db, "SELECT name, value, protocol, stage, suite, source, request FROM metrics "
                        "WHERE commit_id = ? ORDER BY suite, ifnull(request, -1), stage, name", [commit_id],
                        factory=Metric)

    def log(self, rev: str = HEAD, limit: int | None = None) -> list[CommitInfo]:
        """Commits from `rev` back along first parents, newest first."""
        ids = history.ancestors(self.db, self.resolve(rev))
        return [self.get_commit(c) for c in ids[:limit]]

    def manifest(self, rev: str = HEAD) -> dict[str, history.ManifestEntry]:
        return history.manifest(self.db, self.resolve(rev))

    def changes(self, rev: str) -> list[history.Change]:
        return history.changes(self.db, self.resolve(rev))

    def adapter_ops(self, rev: str) -> list[tuple[str, str, str]]:
        """(op, object id, kind) of the adapter operations the commit `rev` itself made."""
        return history.adapter_ops(self.db, self.resolve(rev))

    def count_commits(self) -> int:
        return history.count_commits(self.db)

    def materialize(self, rev: str = HEAD, names: Iterable[str] | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
        """The model's tensors at `rev`, each recomputed and checked against its recorded hash."""
        commit_id = self.resolve(rev)
        manifest = history.manifest(self.db, commit_id)
        wanted = sorted(manifest) if names is None else list(names)
        out = {}
        for name in progress_bar(wanted, desc="materialise", disable=not progress):
            entry = manifest.get(name)
            if entry is None:
                raise KeyError(f"no tensor named {name!r} at {rev}")
            out[name] = self.materializer.value_of(history.change(self.db, entry.commit_id, name))
        return out

    def files(self, rev: str = HEAD) -> dict[str, bytes]:
        """The config and tokenizer files at `rev`."""
        return {p: self.store.get_blob(oid) for p, oid in history.files(self.db, self.resolve(rev)).items()}

    def memory(self, method: str, rev: str = HEAD) -> list[dict[str, torch.Tensor]]:
        """`method`'s memory of the edits in effect at `rev`, oldest first (reverted edits drop out)."""
        return [self.store.get_tensors(oid)[0] for _, oid in history.method_memory(self.db, self.resolve(rev), method)]

    def adapters(self, rev: str = HEAD) -> list[tuple[history.AdapterRef, Adapter]]:
        """Adapters in effect at `rev`, loaded."""
        out = []
        for ref in history.adapters(self.db, self.resolve(rev)):
            tensors, metadata = self.store.get_tensors(ref.object_id)
            out.append((ref, Adapter(ref.kind, tensors, json.loads(metadata.get("config", "{}")))))
        return out

    # -- writing: the base -----------------------------------------------------------------

    def _commit_base(self, src, *, copy: bool, dtype: torch.dtype | None, progress: bool,
                     message: str | None) -> None:
        with self.store.batch():
            changes, files, total = self._store_base(src, copy=copy, dtype=dtype, progress=progress)
        staged = self._stage_root(src, changes, files, total, message or f"init from {src.description}")
        with dbm.write(self.db):
            self.write_commits([staged])
            self.finish_init({DEFAULT_BRANCH: staged.id}, DEFAULT_BRANCH, "init", progress=progress)

    def add_base(self, source: str | None, *, branch: str | None = None, copy: bool = True,
                 dtype: torch.dtype | None = None, progress: bool = False,
                 message: str | None = None) -> tuple[str, CommitInfo]:
        """Another root commit (a newer release or a fine-tune of the same architecture) on a branch of
        its own (default `base-N`), its tensors stored by content, so those equal to a stored tensor
        share its object. HEAD stays where it is. A model whose tensor names or shapes (or config
        `model_type`) differ from HEAD's base is refused before anything is written. Returns the branch
        and the new root commit."""
        with open_source(source) as src:
            if not copy and not src.can_reference:
                raise KeditError("--no-copy needs safetensors weights; a GGUF file is dequantised at init "
                                 "and its tensors must be stored")
            with self.lock():
                name = branch or self._next_base_branch()
                check_ref_name(name, "branch")
                if self.refs.deref(BRANCH_PREFIX + name) is not None:
                    raise KeditError(f"a branch named {name!r} already exists", hint="choose another with --branch")
                root = history.ancestors(self.db, self._require_head())[-1]
                self._require_same_architecture(src, root)
                with self.store.batch():
                    changes, files, total = self._store_base(src, copy=copy, dtype=dtype, progress=progress)
                staged = self._stage_root(src, changes, files, total, message or f"add base {src.description}")
                with dbm.write(self.db):
                    self.write_commits([staged])
                    self.refs.create(BRANCH_PREFIX + name, staged.id, f"init: add base {src.description}")
                return name, self.get_commit(staged.id)

    def _next_base_branch(self) -> str:
        """`base-N`: N one more than the number of root commits, skipping names already taken."""
        n = self.db.execute("SELECT COUNT(*) FROM commits WHERE parent IS NULL").fetchone()[0] + 1
        while self.refs.deref(BRANCH_PREFIX + f"base-{n}") is not None:
            n += 1
        return f"base-{n}"

    def _require_same_architecture(self, src, root: str) -> None:
        """Refuse a source whose tensors (names, shapes) or config model_type differ from `root`'s."""
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for weight_file in src.weight_files:
            try:
                with safe_open(weight_file, "pt") as handle:
                    shapes.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})  # noqa: SIM118
            except (SafetensorError, ValueError, OSError) as e:
                raise ModelSourceError(f"{weight_file} is not a readable safetensors file ({e})") from e
        base = {n: e.shape for n, e in history.manifest(self.db, root).items()}
        what = f"{src.description} is not the same architecture as the base {short_id(root)}"
        missing, extra = sorted(set(base) - set(shapes)), sorted(set(shapes) - set(base))
        if missing or extra:
            raise ModelSourceError(f"{what}: " + (f"it has no tensor {missing[0]}" if missing
                                                  else f"it has a tensor {extra[0]} the base has not")
                                   + f" ({len(missing)} missing, {len(extra)} extra)")
        for n in sorted(base):
            if shapes[n] != base[n]:
                raise ModelSourceError(f"{what}: {n} is {list(shapes[n])} there, {list(base[n])} in the base")
        ours = history.files(self.db, root).get("config.json")
        if ours is not None and "config.json" in src.kept_files:
            mine = json.loads(self.store.get_blob(ours)).get("model_type")
            theirs = json.loads(src.kept_files["config.json"].read_text()).get("model_type")
            if mine != theirs:
                raise ModelSourceError(f"{what}: its model_type is {theirs!r}, the base's {mine!r}")

    def _stage_root(self, src, changes: dict[str, dict], files: dict[str, str], total: int,
                    message: str) -> StagedCommit:
        """A root commit (no parent) of the stored tensors and files of `src`."""
        record = {
            "kind": "init", "parents": [], "origin": src.origin, "message": message,
            "tensors": {n: {"source": None, "steps": [["", c["object"], "exact"]], "hash": c["hash"]}
                        for n, c in changes.items()},
            "files": files, "author": config.author(self.path), "created": now_iso(),
            "kedit_version": kedit.__version__,
        }
        cid = record_id(record)
        return StagedCommit(cid, None, record, info={"origin": src.origin, "bytes": total}, files=files, changes=[
            StagedChange(name, None, c["hash"], c["dtype"], c["shape"], "exact", None, None, None, c["stored"],
                         [(cid, c["object"], "exact")]) for name, c in changes.items()])

    def _store_base(self, src, *, copy: bool, dtype: torch.dtype | None,
                    progress: bool) -> tuple[dict[str, dict], dict[str, str], int]:
        """Hash and store every tensor of the source (or reference it): one pass over the bytes."""
        changes: dict[str, dict] = {}
        total = 0
        for weight_file in src.weight_files:
            try:
                tensors, _ = read_safetensors(weight_file)
            except (SafetensorError, ValueError) as e:  # a file named .safetensors is not one yet
                raise ModelSourceError(f"{weight_file} is not a readable safetensors file ({e})") from e
            for name in tensors:  # they become file names in the working model and on the Hub
                try:
                    check_tensor_name(name)
                except BadNameError as e:
                    raise ModelSourceError(f"{weight_file.name}: {e}") from None
                if name in changes:
                    raise ModelSourceError(f"{weight_file.name}: the tensor {name!r} is also in another weight file")
            for name in progress_bar(sorted(tensors), desc=f"hash+store {weight_file.name}", disable=not progress):
                tensor = tensors[name]
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensor_hash = hash_tensor(tensor)
                if copy or dtype is not None:
                    obj = self.store.put_tensors({"value": tensor}, tensor_hashes={"value": tensor_hash})
                else:
                    obj = self.store.put_reference(weight_file, name, tensor_hash)
                total += tensor.numel() * tensor.element_size()
                changes[name] = {"hash": tensor_hash, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                                 "object": obj.id, "stored": obj.size}
        files = {path: self.store.put_blob(p.read_bytes()).id for path, p in src.kept_files.items()}
        return changes, files, total

    def write_commits(self, staged: Sequence[StagedCommit], *, expected_parent: HeadState | None = None,
                      message: str = "") -> None:
        """Record `staged` commits (their objects already stored) in one transaction: the one
        writer of commit rows, for edits, reverts, the base and Hub fetch alike.

        Without `expected_parent`, refs are left alone (fetch moves remote-tracking refs, init
        creates branches). With it, the single staged commit must have `expected_parent.commit`
        as its parent, and HEAD (its branch, or HEAD itself when detached) moves to it by
        compare-and-swap: if HEAD is no longer `expected_parent`, HeadMovedError and nothing is
        written. The caller holds the writer lock.
        """
        with dbm.write(self.db):
            if expected_parent is not None:
                (commit,) = staged
                assert commit.parent == expected_parent.commit, "a commit is staged on its expected parent"
                self._check_head(expected_parent, _edit_ran(expected_parent))
            depths = self._depths(staged)
            for c in sorted(staged, key=lambda c: depths[c.id]):
                self._insert(c, depths[c.id])
            if expected_parent is not None:
                self._advance_head(expected_parent.commit, staged[0].id, message)

    def _depths(self, staged: Sequence[StagedCommit]) -> dict[str, int]:
        """Each staged commit's first-parent distance from the initial commit."""
        by_id = {c.id: c for c in staged}
        depths: dict[str, int] = {}
        for c in staged:
            chain: list[StagedCommit] = []  # c and its staged ancestors whose depth is not known yet
            while c.id not in depths and c not in chain:
                chain.append(c)
                if c.parent not in by_id:
                    break
                c = by_id[c.parent]
            for x in reversed(chain):
                depths[x.id] = 0 if x.parent is None else (
                    depths[x.parent] if x.parent in depths else self.get_commit(x.parent).depth) + 1
        return depths

    def _insert(self, c: StagedCommit, depth: int) -> None:
        record = c.record
        self.db["commits"].insert({
            "id": c.id, "parent": c.parent, "depth": depth, "kind": record["kind"], "method": c.method,
            "hparams": json.dumps(c.hparams), "requests": json.dumps(c.requests), "info": json.dumps(c.info),
            "message": record["message"], "author": record["author"], "created": record["created"],
            "record": canonical_json(record).decode(),
        })
        self.db["commit_parents"].insert_all([{"commit_id": c.id, "seq": i, "parent_id": p}
                                              for i, p in enumerate(c.parents)])
        for ch in c.changes:
            self.db["tensor_changes"].insert({
                "commit_id": c.id, "name": ch.name, "source_commit": ch.source, "result_hash": ch.hash,
                "dtype": ch.dtype, "shape": json.dumps(ch.shape), "encoding": ch.encoding, "rank": ch.rank,
                "delta_norm": ch.norm, "rel_change": ch.rel, "stored_bytes": ch.stored,
            })
            self.db["tensor_steps"].insert_all([
                {"commit_id": c.id, "name": ch.name, "seq": i, "origin_commit": origin, "object_id": oid,
                 "encoding": enc} for i, (origin, oid, enc) in enumerate(ch.steps)
            ])
        self.db["adapter_ops"].insert_all([
            {"commit_id": c.id, "seq": i, "op": op, "object_id": oid, "kind": kind, "origin_commit": origin}
            for i, (op, oid, kind, origin) in enumerate(c.adapter_ops)])
        self.db["files"].insert_all([{"commit_id": c.id, "path": p, "object_id": o} for p, o in c.files.items()])
        if c.memory is not None:
            self.db["method_memory"].insert({"commit_id": c.id, "method": c.memory[0], "object_id": c.memory[1]})
        self._insert_metrics(c.id, c.metrics)
        tables.insert_probes(self.db, [{"kind": k, "prompt": p, "answer": a, "commit_id": c.id, "created": now_iso()}
                                       for k, p, a in c.probes])

    # -- writing: edits --------------------------------------------------------------------

    def commit(self, deltas: Mapping[str, WeightDelta], *, adapters: Iterable[Adapter] = (),
               requests: Iterable[Mapping[str, Any]] = (), method: str | None = None,
               hparams: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None,
               message: str | None = None, metrics: Iterable[Metric] = (),
               memory: Mapping[str, torch.Tensor] | None = None,
               expected_parent: HeadState | None = None, picked_from: str | None = None,
               probes: Iterable[tuple[str, str, str]] = ()) -> CommitInfo:
        """Record an edit on top of HEAD and move the current branch to it.

        `memory`: tensors the method keeps for its later edits (`Repository.memory`).
        `probes`: (kind, prompt, answer) probes the commit holds (`kedit check` runs its edit
        probes wherever it is in effect), recorded in the same transaction.
        `picked_from`: the commit whose stored deltas these are (cherry-pick), named in the record.
        `expected_parent`: where HEAD was when the edit's model was loaded (`head_state()`);
        the deltas apply to that commit, and if HEAD has moved since (another edit, a
        checkout), HeadMovedError is raised and nothing is committed.

        Each delta is applied to HEAD's tensor with the canonical arithmetic; the result's hash
        is recorded and the smallest exact encoding stored (low-rank factors or a dense delta;
        exact bytes for replacements). Raises DeltaError for unknown tensors, shape mismatches,
        non-finite results, or an edit that changes nothing.
        """
        adapters = list(adapters)
        for name, delta in deltas.items():
            require_finite(vars(delta), f"the delta for {name}")
        for adapter in adapters:
            require_finite(adapter.tensors, f"the {adapter.kind} adapter")
        require_finite(memory or {}, f"the {method or 'method'} memory")
        with self.lock():
            self._sync_worktree()
            at = self._check_head(expected_parent, _edit_ran(expected_parent)) if expected_parent \
                else self.head_state()
            parent = at.commit  # refused before the work, and again when recorded
            manifest = history.manifest(self.db, parent)
            staged: dict[str, dict] = {}
            for name in sorted(deltas):
                staged_change = self._stage_delta(parent, manifest, name, deltas[name])
                if staged_change is not None:
                    staged[name] = staged_change
            adapter_objs = [self.store.put_tensors(a.tensors, {"kind": a.kind, "config": json.dumps(a.config)})
                            for a in adapters]
            if not staged and not adapters:
                raise DeltaError("the edit changes no tensor: nothing to commit")
            memory_obj = self.store.put_tensors(dict(memory), {"kind": "memory", "method": method or ""}) \
                if memory else None
            requests = [jsonable(dict(r)) for r in requests]
            record = {
                "kind": "edit", "parents": [parent], "method": method, "hparams": jsonable(dict(hparams or {})),
                "requests": requests, "message": message or _default_message(method, requests),
                "tensors": {n: {"source": parent, "steps": [["", s["object"], s["encoding"]]], "hash": s["hash"]}
                            for n, s in staged.items()},
                "adapters": [["add", o.id, a.kind, ""] for o, a in zip(adapter_objs, adapters, strict=True)],
                "author": config.author(self.path), "created": now_iso(), "kedit_version": kedit.__version__,
            }
            if memory_obj is not None:
                record["memory"] = memory_obj.id
            if picked_from is not None:
                record["picked_from"] = picked_from
            cid = record_id(record)
            self.write_commits([StagedCommit(
                cid, parent, record, method, record["hparams"], requests, jsonable(dict(info or {})),
                changes=[StagedChange(name, parent, s["hash"], s["dtype"], s["shape"], s["encoding"], s["rank"],
                                      s["norm"], s["rel"], s["stored"], [(cid, s["object"], s["encoding"])])
                         for name, s in staged.items()],
                adapter_ops=[("add", o.id, a.kind, cid) for o, a in zip(adapter_objs, adapters, strict=True)],
                memory=(method or "", memory_obj.id) if memory_obj is not None else None, metrics=list(metrics),
                probes=list(probes),
            )], expected_parent=at, message=f"commit: {record['message']}")
            self._sync_worktree(known_values={n: s["value"] for n, s in staged.items()})
            return self.get_commit(cid)

    def _stage_delta(self, parent: str, manifest: dict[str, history.ManifestEntry], name: str,
                     delta: WeightDelta) -> dict | None:
        if name not in manifest:
            close = [n for n in manifest if name.split(".")[-1] in n][:3]
            raise DeltaError(f"the model has no tensor named {name!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        before = self.materializer.value(parent, name)
        step, encoding = encode_delta(delta, before)
        try:
            after = apply_step(before, step)
        except ValueError as e:
            raise DeltaError(f"delta for {name}: {e}") from e
        if not finite(after):
            raise DeltaError(f"the delta for {name} produces non-finite values; nothing was committed")
        result_hash = hash_tensor(after)
        if result_hash == manifest[name].hash:
            return None
        payload = {"lowrank": lambda: {"a": step.a, "b": step.b}, "dense": lambda: {"delta": step.delta},
                   "exact": lambda: {"value": step.value}}[encoding]()
        obj = self.store.put_tensors(payload)
        norm, rel = change_size(before, after)
        return {"hash": result_hash, "dtype": dtype_name(after.dtype), "shape": list(after.shape),
                "encoding": encoding, "rank": step.rank if isinstance(step, LowRank) else None,
                "norm": norm, "rel": rel, "stored": obj.size,
                "object": obj.id, "value": after}

    def _insert_metrics(self, cid: str, metrics: Iterable[Metric]) -> None:
        # measured here (source ''), replacing a remote's
        dbm.put_metrics(self.db, cid, [{"name": m.name, "value": float(m.value), "protocol": m.protocol,
                                        "stage": m.stage, "suite": m.suite, "request": m.request,
                                        "created": now_iso()} for m in metrics], source="")

    def record_metrics(self, rev: str, metrics: Iterable[Metric]) -> None:
        """Store (or replace) measurements of a commit; they are not part of its id."""
        cid = self.resolve(rev)
        with dbm.write(self.db):
            self._insert_metrics(cid, metrics)

    def metric_rows(self, commit_id: str) -> list[dict[str, Any]]:
        """A commit's metrics as stored (with when each was measured), for a Hub document."""
        return dbm.rows(self.db, "SELECT name, value, protocol, stage, suite, request, created FROM metrics "
                        "WHERE commit_id = ? ORDER BY suite, ifnull(request, -1), stage, name", [commit_id])

    def record_fetched_metrics(self, rows_by_commit: Mapping[str, Iterable[Mapping[str, Any]]], source: str) -> None:
        """Store metrics a remote sent ({commit: rows as `metric_rows` gives them}), marked with its name."""
        with dbm.write(self.db):
            for cid, rows in rows_by_commit.items():
                dbm.put_metrics(self.db, cid, rows, source=source)

    def head_state(self) -> HeadState:
        """Where HEAD is now: pass it as `expected_parent` to commit what was computed there."""
        return HeadState(self.head_branch(), self._require_head())

    def _check_head(self, expected: HeadState, doing: str) -> HeadState:
        """HEAD's state, if it is still `expected`; else HeadMovedError saying what was going on."""
        current = self.head_state()
        if current != expected:
            raise HeadMovedError(f"HEAD moved from {expected} to {current} while {doing}")
        return current

    def _require_head(self) -> str:
        head = self.head()
        if head is None:
            raise RevisionError("HEAD points to no commit", rev=HEAD)
        return head

    def _advance_head(self, old: str, new: str, message: str) -> None:
        branch = self.head_branch()
        self.refs.update(BRANCH_PREFIX + branch if branch else HEAD, new, old, message)
        if branch:
            self.refs.log(HEAD, old, new, message)

    def revert(self, rev: str, message: str | None = None) -> CommitInfo:
        """A new commit whose state is HEAD's history without `rev`'s delta, recomputed from the
        base (never subtracted), so reverting every edit gives the base bit for bit."""
        with self.lock():
            self._sync_worktree()
            at = self.head_state()
            head = at.commit
            target = self.resolve(rev)
            if target not in reachable(self.db, [head]):
                raise RevisionError(f"{rev} is not in the history of HEAD", rev=rev)
            reverted = self.get_commit(target)
            if reverted.parent is None:
                raise KeditError("the initial commit (the base model) cannot be reverted")
            if reverted.kind == "merge":
                short = short_id(target)
                raise KeditError(f"{short} is a merge: it brought other commits' edits, revert those",
                                 hint=f"kedit log {short}^1..{short}^2 lists them")
            staged: dict[str, dict] = {}
            adapter_ops: list[list[str]] = []
            if reverted.kind == "revert":  # reverting a revert re-applies the original edit's own deltas
                original = reverted.info["reverts"]
                for ch in history.changes(self.db, original):
                    own = [s for s in ch.steps if s.origin == original]
                    staged[ch.name] = self._replay(head, ch.name, head, own)
                active = {r.object_id for r in history.adapters(self.db, head)}
                adapter_ops = [["add", oid, kind, original] for oid, kind in self.db.execute(
                    "SELECT object_id, kind FROM adapter_ops WHERE commit_id = ? AND op = 'add' ORDER BY seq",
                    [original]) if oid not in active]
            else:
                for ch in history.changes(self.db, target):
                    replay = self._replay_without(head, ch.name, target)
                    if replay is not None:
                        staged[ch.name] = replay
                adapter_ops = [["remove", r.object_id, r.kind, r.origin]
                               for r in history.adapters(self.db, head) if r.origin == target]
            if not staged and not adapter_ops:
                raise KeditError(f"commit {short_id(target)} has no effect left at HEAD (already reverted?)")
            msg = message or f'Revert "{reverted.message}"'
            record = {
                "kind": "revert", "parents": [head], "reverts": target, "message": msg,
                "tensors": {n: {"source": s["source"], "steps": [list(x) for x in s["steps"]], "hash": s["hash"]}
                            for n, s in staged.items()},
                "adapters": adapter_ops,
                "author": config.author(self.path), "created": now_iso(), "kedit_version": kedit.__version__,
            }
            cid = record_id(record)
            later = history.oldest_first(self.db, reachable(self.db, [head]) - reachable(self.db, [target]))[::-1]
            info = {"reverts": target, "later_commits": later,
                    "note": "later edits were computed on a model that contained the reverted one; re-evaluate"}
            self.write_commits([StagedCommit(
                cid, head, record, requests=reverted.requests, info=info,
                changes=[StagedChange(name, s["source"], s["hash"], s["dtype"], s["shape"], "replay", None,
                                      s["norm"], s["rel"], 0, s["steps"]) for name, s in staged.items()],
                adapter_ops=[(op, oid, kind, origin) for op, oid, kind, origin in adapter_ops],
            )], expected_parent=at, message=f"revert: {msg}")
            self._sync_worktree(known_values={n: s["value"] for n, s in staged.items()})
            return self.get_commit(cid)

    def _replay_without(self, head: str, name: str, target: str) -> dict | None:
        """How `name` is recomputed without `target`'s steps: a source commit and the steps after it."""
        chain = history.defining_chain(self.db, head, name)
        effective = [s for ch in chain for s in ch.steps]
        kept = [s for s in effective if s.origin != target]
        if len(kept) == len(effective):
            return None
        source, prefix = None, 0
        for ch in chain:
            if any(s.origin == target for s in ch.steps):
                break
            source, prefix = ch.commit_id, prefix + len(ch.steps)
        return self._replay(head, name, source, kept[prefix:])

    def _replay(self, head: str, name: str, source: str | None, steps: list[history.Step]) -> dict:
        """Stage a change of `name`: `source`'s value with `steps` applied, compared with HEAD's."""
        value = self.materializer.value(source, name) if source else None
        for step in steps:
            delta = load_step(self.store, step)
            value = delta.value if value is None and isinstance(delta, Replace) else apply_step(value, delta)
        before = self.materializer.value(head, name)
        norm, rel = change_size(before, value)
        return {"source": source, "steps": [(s.origin, s.object_id, s.encoding) for s in steps],
                "hash": hash_tensor(value), "dtype": dtype_name(value.dtype), "shape": list(value.shape),
                "norm": norm, "rel": rel, "value": value}

    # -- merge and cherry-pick -------------------------------------------------------------

    def cherry_pick(self, rev: str, *, expected_parent: HeadState | None = None, message: str | None = None,
                    note: str = "cherry_picked_from", record_origin: bool = True) -> CommitInfo:
        """A new edit on HEAD made of `rev`'s own stored deltas, adapters and method memory,
        applied with the canonical arithmetic; its record names `rev` (`picked_from`).

        `expected_parent`: refuse (HeadMovedError) unless HEAD is there when it is recorded.
        `note`: the info key naming where the commit came from (pull --rebase says rebased_from).
        The probes `rev` holds (its edit probes) are carried: the new commit holds them too, so
        `kedit check` runs them wherever it is in effect. Metrics measured for `rev` are not
        copied: they were measured on another model.
        """
        at = expected_parent or self.head_state()
        cid = self.resolve(rev)
        c = self.get_commit(cid)
        if c.kind != "edit":
            raise KeditError(f"cannot pick {short_id(cid)}: only edit commits carry deltas of their own "
                             f"(it is a {c.kind} commit)")
        if cid in reachable(self.db, [at.commit]):
            raise KeditError(f"{short_id(cid)} is already in the history of HEAD: picking it would apply it twice")
        deltas = {ch.name: load_step(self.store, s) for ch in history.changes(self.db, cid)
                  for s in ch.steps if s.origin == cid}
        adapters = []
        for op, oid, kind, origin in self.db.execute(
                "SELECT op, object_id, kind, origin_commit FROM adapter_ops WHERE commit_id = ? ORDER BY seq", [cid]):
            if op == "add" and origin == cid:
                tensors, metadata = self.store.get_tensors(oid)
                adapters.append(Adapter(kind, tensors, json.loads(metadata.get("config", "{}"))))
        row = dbm.one(self.db, "SELECT object_id FROM method_memory WHERE commit_id = ?", [cid])
        memory = self.store.get_tensors(row[0])[0] if row else None
        probes = [(kind, prompt, answer) for _, kind, prompt, answer, holder in tables.probe_rows(self.db)
                  if holder == cid]
        return self.commit(deltas, adapters=adapters, requests=c.requests, method=c.method, hparams=c.hparams,
                           info={**c.info, note: cid}, message=message or c.message, memory=memory,
                           expected_parent=at, picked_from=cid if record_origin else None, probes=probes)

    def merge(self, rev: str, *, no_ff: bool = False, take: str | None = None,
              take_subjects: Mapping[str, str] | None = None,
              threshold: float = DEFAULT_THRESHOLD, adapter_check: AdapterCheck | None = None,
              message: str | None = None) -> MergeResult:
        """Bring `rev`'s edits into HEAD (`--strategy compose`): fast-forward when HEAD is in
        `rev`'s history (unless `no_ff`), else a merge commit with parents [HEAD, rev].

        The merge state is the merge base's value of each tensor with the stored delta steps of
        both sides applied by the canonical arithmetic, HEAD's side first, then `rev`'s, each
        oldest first (what either side removed of the base's stays removed), and the adapters
        likewise: nothing is subtracted, so the merge commit is proved by hash like any other.
        Conflicts (kedit.core.conflicts; `adapter_check` is the adapter kinds' own check) raise
        MergeConflictError and change nothing, unless `take` ("ours" or "theirs") says which
        side's conflicting edits to keep: the other side's are left out of the merge.
        `take_subjects` ({subject: "ours" | "theirs"}) says it per conflict, by the conflict's
        subject (exact, case-sensitive; kedit.core.conflicts.resolve), `take` then covering the
        rest; a subject that names no conflict, or choices that contradict, raise KeditError, and
        conflicts left uncovered MergeConflictError (listing them), each changing nothing.
        """
        resolve_conflicts([], take)  # a side that is not ours or theirs, before anything is read
        with self.lock():
            self._sync_worktree()
            at = self.head_state()
            ours, theirs = at.commit, self.resolve(rev)
            if theirs in reachable(self.db, [ours]):
                resolve_conflicts([], None, take_subjects)  # a subject given where nothing conflicts
                return MergeResult("up-to-date", ours, ours, theirs, theirs)
            base = merge_base(self.db, ours, theirs)
            if base is None:
                raise KeditError(f"HEAD and {rev} have no history in common: nothing to merge from")
            if base == ours and not no_ff:
                resolve_conflicts([], None, take_subjects)
                if self.worktree is not None:
                    self._update_worktree(theirs, force=False)
                with dbm.write(self.db):
                    self._check_head(at, "the merge ran; nothing was changed")
                    self._advance_head(ours, theirs, f"merge {rev}: fast-forward")
                return MergeResult("fast-forward", theirs, ours, theirs, base)
            plan = self._merge_plan(base, ours, theirs, take, take_subjects, threshold, adapter_check)
            msg = message or (f"Merge branch '{rev}'" if self.refs.deref(BRANCH_PREFIX + rev) else
                              f"Merge {short_id(theirs)}")
            record: dict[str, Any] = {
                "kind": "merge", "parents": [ours, theirs], "merge_base": base, "strategy": "compose",
                "message": msg,
                "tensors": {n: {"source": s["source"], "steps": [list(x) for x in s["steps"]], "hash": s["hash"]}
                            for n, s in plan.staged.items()},
                "adapters": [list(op) for op in plan.adapter_ops],
                "author": config.author(self.path), "created": now_iso(), "kedit_version": kedit.__version__,
            }
            if plan.dropped:
                record["dropped"] = sorted(plan.dropped)
            cid = record_id(record)
            info = {"merge_base": base, "strategy": "compose", "ours_commits": len(plan.ours),
                    "theirs_commits": len(plan.theirs)}
            if plan.conflicts:
                info["resolved"] = {"take": take, "take_subjects": dict(take_subjects or {}),
                                    "conflicts": Resolution(plan.conflicts, plan.took, plan.dropped).to_dicts(),
                                    "left_out": sorted(plan.dropped)}
            self.write_commits([StagedCommit(
                cid, ours, record, info=info,
                changes=[StagedChange(name, s["source"], s["hash"], s["dtype"], s["shape"], "replay", None,
                                      s["norm"], s["rel"], 0, s["steps"]) for name, s in plan.staged.items()],
                adapter_ops=list(plan.adapter_ops),
            )], expected_parent=at, message=f"merge: {msg}")
            self._sync_worktree(known_values={n: s["value"] for n, s in plan.staged.items()})
            return MergeResult("merged", cid, ours, theirs, base, plan.conflicts, sorted(plan.dropped),
                               len(plan.staged), len(plan.adapter_ops), plan.took)

    def record_merge(self, rev: str, *, strategy: str, replaced: Iterable[str], expected_parent: HeadState,
                     message: str | None = None, info: Mapping[str, Any] | None = None) -> CommitInfo:
        """A merge commit of HEAD and `rev` whose state is HEAD's: `rev`'s edits `replaced` were
        re-run on this side (`strategy` "replay", kedit/edit/replay.py) as commits HEAD now holds,
        so their own deltas are left out (the record's `dropped`) and their requests stay in effect
        through the re-run commits. HeadMovedError, nothing written, unless HEAD is `expected_parent`."""
        with self.lock():
            at = self._check_head(expected_parent, "the merge ran; nothing was changed")
            theirs = self.resolve(rev)
            base = merge_base(self.db, at.commit, theirs)
            msg = message or (f"Merge branch '{rev}'" if self.refs.deref(BRANCH_PREFIX + rev) else
                              f"Merge {short_id(theirs)}")
            record: dict[str, Any] = {
                "kind": "merge", "parents": [at.commit, theirs], "merge_base": base, "strategy": strategy,
                "message": msg, "tensors": {}, "adapters": [], "dropped": sorted(set(replaced)),
                "author": config.author(self.path), "created": now_iso(), "kedit_version": kedit.__version__,
            }
            cid = record_id(record)
            self.write_commits([StagedCommit(cid, at.commit, record, info={"merge_base": base, "strategy": strategy,
                                                                           **(info or {})})],
                               expected_parent=at, message=f"merge: {msg}")
            return self.get_commit(cid)

    def _merge_plan(self, base: str, ours: str, theirs: str, take: str | None,
                    take_subjects: Mapping[str, str] | None, threshold: float,
                    adapter_check: AdapterCheck | None) -> _MergePlan:
        """What the merge commit records, after the conflicts are found (and resolved by `take`
        and `take_subjects`)."""
        plan = _MergePlan(ours=self._side(base, ours), theirs=self._side(base, theirs))
        live = history.edits_in_effect(self.db, ours) | history.edits_in_effect(self.db, theirs)
        requests = [{c: self.get_commit(c).requests for c in side if c in live} for side in (plan.ours, plan.theirs)]
        conflicts = request_conflicts(*requests)
        effective = {}
        names = self._names_changed(plan.ours + plan.theirs)
        loaded: dict[str, WeightDelta] = {}

        def delta(step: history.Step) -> WeightDelta:
            if step.object_id not in loaded:
                loaded[step.object_id] = load_step(self.store, step)
            return loaded[step.object_id]

        for name in names:
            b, o, t = (self._effective_steps(c, name) for c in (base, ours, theirs))
            effective[name] = (b, o, t)
            ours_new = [s for s in o if s not in set(b)]
            theirs_new = [s for s in t if s not in set(b) and s not in set(o)]
            for sa in ours_new:
                for sb in theirs_new:
                    found = delta_conflict(name, sa.origin, delta(sa), sb.origin, delta(sb), threshold)
                    if found is not None:
                        conflicts.append(found)
        ad_base, ad_ours, ad_theirs = (history.adapters(self.db, c) for c in (base, ours, theirs))
        conflicts += adapter_conflicts(
            adapter_check, [(a.origin, self._adapter(a)) for a in ad_ours if a not in ad_base],
            [(a.origin, self._adapter(a)) for a in ad_theirs if a not in ad_base and a not in ad_ours])
        requests_of = {c: self.get_commit(c).requests for c in {*plan.ours, *plan.theirs}}
        plan.conflicts = list(dict.fromkeys(with_subjects(c, requests_of) for c in conflicts))
        if plan.conflicts and take is None and not take_subjects:
            raise MergeConflictError(f"the merge of {short_id(theirs)} into {short_id(ours)} has "
                                     f"{len(plan.conflicts)} conflict(s); nothing was changed", plan.conflicts)
        resolution = resolve_conflicts(plan.conflicts, take, take_subjects)
        plan.took, plan.dropped = resolution.took, resolution.left_out
        for name, (b, o, t) in effective.items():
            bset, oset = set(b), set(o)
            merged = ([s for s in b if s in oset and s in set(t)]
                      + [s for s in o if s not in bset and s.origin not in plan.dropped]
                      + [s for s in t if s not in bset and s not in oset and s.origin not in plan.dropped])
            if merged != o:
                staged = self._restage(ours, name, merged)
                if staged["hash"] != history.defining_change(self.db, ours, name).result_hash:
                    plan.staged[name] = staged
        merged_ad = ([a for a in ad_ours if (a not in ad_base or a in ad_theirs) and a.origin not in plan.dropped]
                     + [a for a in ad_theirs if a not in ad_base and a not in ad_ours and a.origin not in plan.dropped])
        plan.adapter_ops = ([("remove", a.object_id, a.kind, a.origin) for a in ad_ours if a not in merged_ad]
                            + [("add", a.object_id, a.kind, a.origin) for a in merged_ad if a not in ad_ours])
        return plan

    def _side(self, base: str, tip: str) -> list[str]:
        """The commits of `tip`'s history after `base`, oldest first."""
        return history.oldest_first(self.db, reachable(self.db, [tip]) - reachable(self.db, [base]))

    def _names_changed(self, commits: list[str]) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT name FROM tensor_changes WHERE commit_id IN (SELECT value FROM json_each(?)) "
            "ORDER BY name", [json.dumps(commits)])]

    def _effective_steps(self, commit_id: str, name: str) -> list[history.Step]:
        """Every delta step that gives `name` its value at `commit_id`, in order (from the base's)."""
        return [s for ch in history.defining_chain(self.db, commit_id, name) for s in ch.steps]

    def _adapter(self, ref: history.AdapterRef) -> Adapter:
        tensors, metadata = self.store.get_tensors(ref.object_id)
        return Adapter(ref.kind, tensors, json.loads(metadata.get("config", "{}")))

    def _restage(self, head: str, name: str, steps: list[history.Step]) -> dict:
        """Stage `name` as the value `steps` give: from the latest change of HEAD's chain whose steps
        start them (so HEAD's own value is reused when the steps only add to it), the rest applied."""
        source, prefix, seen = None, 0, []
        for ch in history.defining_chain(self.db, head, name):
            seen += ch.steps
            if seen != steps[:len(seen)]:
                break
            source, prefix = ch.commit_id, len(seen)
        return self._replay(head, name, source, steps[prefix:])

    # -- refs and the working model --------------------------------------------------------

    def _sync_worktree(self, *, force: bool = False, progress: bool = False,
                       known_values: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Bring the working model to HEAD (refusing to overwrite hand-made changes unless forced)."""
        if self.worktree is None:
            return []
        head = self._require_head()
        if self.worktree.commit == head and not force:
            self._refuse_if_dirty()  # before a write command changes anything, not after
            return []
        return self._update_worktree(head, force=force, progress=progress, known_values=known_values)

    def _refuse_if_dirty(self) -> None:
        assert self.worktree is not None
        dirty = self.worktree.modified()
        if dirty:
            names = ", ".join(sorted(dirty)[:3]) + (" ..." if len(dirty) > 3 else "")
            raise WorktreeDirtyError(f"the working model has changes kedit did not make: {names}")

    def _update_worktree(self, commit_id: str, *, force: bool, progress: bool = False,
                         known_values: dict[str, torch.Tensor] | None = None) -> list[str]:
        assert self.worktree is not None
        if not force:
            self._refuse_if_dirty()
        manifest = history.manifest(self.db, commit_id)
        index = self.worktree.read_index()
        old_files = set(index.get("files", []))
        was = history.files(self.db, index["commit"]) if index.get("commit") else {}  # another root's may differ
        new_files = history.files(self.db, commit_id)
        files = {p: (self.store.get_blob(o) if p not in old_files or force or was.get(p) != o else None)
                 for p, o in new_files.items()}
        bar = progress_bar(total=len(manifest), desc="checkout", disable=not progress)

        def value_of(name: str) -> torch.Tensor:
            bar.update(1)
            return self.materializer.value_of(history.change(self.db, manifest[name].commit_id, name))

        with bar:
            return self.worktree.update(commit_id, manifest, files, value_of, known_values, keep=self.cache.adopt)

    def checkout(self, rev: str, *, force: bool = False) -> str:
        """Switch HEAD (and the working model) to a branch, or detach it at a commit.

        `HEAD` itself stays where it is (on its branch), so `checkout --force HEAD` only
        discards changes made by hand. Leaving commits that no branch or tag holds behind a
        detached HEAD logs a warning naming them, as git does (the reflog still has them).
        """
        with self.lock():
            commit_id = self.resolve(rev)
            is_branch = self.refs.deref(BRANCH_PREFIX + rev) is not None
            if self.worktree is not None:
                self._update_worktree(commit_id, force=force)
            current = self.refs.get(HEAD)
            old_commit = self.head()
            with dbm.write(self.db):
                new = (BRANCH_PREFIX + rev, True) if is_branch else (commit_id, False)
                if rev == HEAD and current is not None:
                    new = current
                if current is not None and not current[1] and current != new:
                    self._warn_left_behind(current[0], commit_id)
                if current != new:
                    message = f"checkout: moving to {rev}"
                    self.refs.update(HEAD, new[0], current[0] if current else None, message, symbolic=new[1])
                    if new[1]:
                        self.refs.log(HEAD, old_commit, commit_id, message)
            return commit_id

    def _warn_left_behind(self, old: str, new: str) -> None:
        """Warn about the commits a detached HEAD leaves at `old` that nothing else holds."""
        kept = reachable(self.db, [new, *self.refs.branches().values(), *self.refs.tags().values()])
        behind = history.oldest_first(self.db, reachable(self.db, [old]) - kept)[::-1]
        if behind:
            shown = ", ".join(f"{short_id(c)} {self.get_commit(c).message!r}" for c in behind[:4])
            more = f" and {len(behind) - 4} more" if len(behind) > 4 else ""
            one = len(behind) == 1
            log.warning("warning: you are leaving %d commit%s behind, not connected to any branch: %s%s; "
                        "to keep %s: kedit branch NAME %s", len(behind), "" if one else "s", shown, more,
                        "it" if one else "them", short_id(old))

    def reset(self, rev: str, *, force: bool = False, expected: HeadState | None = None,
              message: str | None = None) -> str:
        """Move the current branch (or a detached HEAD) to `rev`; the reflog keeps the old position.

        With `expected`, refuse (HeadMovedError, nothing changed) unless HEAD is still there.
        """
        with self.lock():
            commit_id = self.resolve(rev)
            at = self._check_head(expected, "this command ran; nothing was changed") if expected else self.head_state()
            if self.worktree is not None:
                self._update_worktree(commit_id, force=force)
            with dbm.write(self.db):
                self._advance_head(at.commit, commit_id, message or f"reset: moving to {rev}")
            return commit_id

    def move_branch(self, name: str, rev: str, *, expected: str, message: str) -> str:
        """Move the branch `name` from `expected` to `rev` by compare-and-swap (StaleRefError, nothing
        changed, if it moved meanwhile); HEAD and the working model stay where they are."""
        with self.lock(), dbm.write(self.db):
            if self.head_branch() == name:
                raise KeditError(f"the branch {name!r} is checked out: kedit reset moves it with the working model")
            commit_id = self.resolve(rev)
            self.refs.update(BRANCH_PREFIX + name, commit_id, expected, message)
            return commit_id

    def create_branch(self, name: str, rev: str = HEAD) -> str:
        check_ref_name(name, "branch")
        with self.lock(), dbm.write(self.db):
            commit_id = self.resolve(rev)
            self.refs.create(BRANCH_PREFIX + name, commit_id, f"branch: created from {rev}")
            return commit_id

    def delete_branch(self, name: str) -> str:
        with self.lock(), dbm.write(self.db):
            target = self.refs.deref(BRANCH_PREFIX + name)
            if target is None:
                raise RevisionError(f"no branch named {name!r}", rev=name)
            if self.head_branch() == name:
                raise KeditError(f"cannot delete the branch {name!r}: it is checked out",
                                 hint="kedit checkout another branch first")
            self.refs.update(BRANCH_PREFIX + name, None, target, "branch: deleted")
            return target

    def create_tag(self, name: str, rev: str = HEAD) -> str:
        check_ref_name(name, "tag")
        with self.lock(), dbm.write(self.db):
            commit_id = self.resolve(rev)
            self.refs.create(TAG_PREFIX + name, commit_id, f"tag: {name}")
            return commit_id

    def delete_tag(self, name: str) -> str:
        with self.lock(), dbm.write(self.db):
            target = self.refs.deref(TAG_PREFIX + name)
            if target is None:
                raise RevisionError(f"no tag named {name!r}", rev=name)
            self.refs.update(TAG_PREFIX + name, None, target, "tag: deleted")
            return target

    def reflog(self, ref: str = HEAD, limit: int | None = None) -> list[dict[str, Any]]:
        name = self.refs.reflog_name(ref)
        sql = "SELECT id, ref, old, new, message, created FROM reflog WHERE ref = ? ORDER BY id DESC"
        found = dbm.rows(self.db, sql + (f" LIMIT {int(limit)}" if limit else ""), [name])
        if not found and name != HEAD and self.refs.get(name) is None:
            raise RevisionError(f"no ref named {ref!r}", rev=ref)
        return found

    def status(self) -> dict[str, Any]:
        head = self.head()
        out: dict[str, Any] = {"branch": self.head_branch(), "head": head, "path": str(self.path)}
        if self.worktree is not None:
            out["worktree"] = str(self.worktree.folder)
            out["worktree_commit"] = self.worktree.commit
            out["modified"] = self.worktree.modified()
        return out


def _edit_ran(at: HeadState) -> str:
    """What a commit refused because HEAD moved was doing."""
    return f"the edit ran on {short_id(at.commit)}; nothing was committed"


def _default_message(method: str | None, requests: list[dict[str, Any]]) -> str:
    if requests:
        r = requests[0]
        prompt = r.get("prompt", "").replace("{}", r.get("subject", ""))
        more = f" (+{len(requests) - 1} more)" if len(requests) > 1 else ""
        return f"{method or 'edit'}: {prompt} -> {r.get('target_new', '?')}{more}"
    return f"{method or 'edit'}"
