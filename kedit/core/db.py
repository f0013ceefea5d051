"""The SQLite history: commits, tensor changes, refs, reflog and metrics. No tensor bytes.

Calling sequence: `connect(path)` opens a connection configured for kedit (WAL, foreign
keys, busy timeout) and brings the schema up to date; `write(db)` wraps a write in
`BEGIN IMMEDIATE`, so a writer takes SQLite's write lock before it reads what it will
change, and readers never block.

Caveats: WAL needs the database on a local filesystem (not NFS). Migrations are named,
ordered and recorded in `_kedit_migrations`; a database from a newer kedit is refused.

Read-only repositories: when this process may not write the database file or its folder
(another user's repository, a read-only mount), `connect` opens it read-only (`mode=ro`, or
`immutable=1` when WAL's shared-memory file cannot be created and no WAL content is pending),
sets no journal mode and runs no migration, and marks it `read_only`: `write(db)` then refuses
with ReadOnlyRepositoryError. An immutable reader does not see a writer working at the same time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedit.core.errors import IncompleteRepositoryError, ReadOnlyRepositoryError, RepositoryNotFoundError, SchemaError

if TYPE_CHECKING:
    import sqlite_utils
    import sqlite_utils.db

BUSY_TIMEOUT_MS = 30_000

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE commits (
    id TEXT PRIMARY KEY,
    parent TEXT REFERENCES commits(id),
    depth INTEGER NOT NULL,            -- first-parent distance from the initial commit
    kind TEXT NOT NULL,                -- init | edit | revert
    method TEXT,
    hparams TEXT,                      -- JSON
    requests TEXT,                     -- JSON list
    info TEXT,                         -- JSON: the method's diagnostics
    message TEXT NOT NULL,
    author TEXT NOT NULL,
    created TEXT NOT NULL,             -- ISO 8601, UTC
    record TEXT NOT NULL               -- canonical JSON the id is the hash of
);
CREATE INDEX commits_parent ON commits(parent);
CREATE TABLE tensor_changes (
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    source_commit TEXT REFERENCES commits(id),  -- whose value of this tensor the steps start from
    result_hash TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,               -- JSON list
    encoding TEXT NOT NULL,            -- lowrank | dense | exact | replay
    rank INTEGER,
    delta_norm REAL,
    rel_change REAL,
    stored_bytes INTEGER NOT NULL,
    PRIMARY KEY (commit_id, name)
);
CREATE INDEX tensor_changes_name ON tensor_changes(name, commit_id);
CREATE TABLE tensor_steps (
    commit_id TEXT NOT NULL,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    origin_commit TEXT NOT NULL,       -- the commit that introduced this delta
    object_id TEXT NOT NULL,
    encoding TEXT NOT NULL,            -- lowrank | dense | exact
    PRIMARY KEY (commit_id, name, seq),
    FOREIGN KEY (commit_id, name) REFERENCES tensor_changes(commit_id, name) ON DELETE CASCADE
);
CREATE INDEX tensor_steps_object ON tensor_steps(object_id);
CREATE TABLE adapter_ops (
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    op TEXT NOT NULL,                  -- add | remove
    object_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    origin_commit TEXT NOT NULL,
    PRIMARY KEY (commit_id, seq)
);
CREATE TABLE files (
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    object_id TEXT NOT NULL,
    PRIMARY KEY (commit_id, path)
);
CREATE TABLE refs (
    name TEXT PRIMARY KEY,             -- HEAD, refs/heads/<b>, refs/tags/<t>
    target TEXT NOT NULL,              -- a commit id, or for a symbolic ref the ref it points to
    symbolic INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE reflog (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT NOT NULL,
    old TEXT,
    new TEXT,
    message TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE metrics (
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    name TEXT NOT NULL,                -- e.g. reliability, locality, efficacy
    value REAL NOT NULL,
    protocol TEXT NOT NULL,            -- how it was measured, e.g. teacher_forced_token_acc
    stage TEXT NOT NULL,               -- pre | post | eval
    suite TEXT NOT NULL DEFAULT '',    -- which probe set
    created TEXT NOT NULL,
    PRIMARY KEY (commit_id, name, stage, suite)
);
"""

_PROBES = """
CREATE TABLE probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                -- edit: a fact an edit wrote; locality: a fact no edit may change
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    commit_id TEXT,                    -- for edit probes: the commit that wrote the fact
    created TEXT NOT NULL,
    UNIQUE (kind, prompt, answer, commit_id)
);
CREATE TABLE probe_outputs (           -- a commit's state never changes, so its outputs can be kept
    probe_id INTEGER NOT NULL REFERENCES probes(id) ON DELETE CASCADE,
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    setting TEXT NOT NULL,             -- dtype and device the outputs were computed with
    predicted TEXT NOT NULL,           -- JSON: argmax token ids at the answer positions
    accuracy REAL NOT NULL,
    PRIMARY KEY (probe_id, commit_id, setting)
);
"""

# Remotes live in the database, not in a side file: a fetch records the commits it brings, the
# remote-tracking ref (refs/remotes/R/B, which gc treats as reachable) and the Hub commit the
# branch was at, all in one transaction.
_REMOTES = """
CREATE TABLE remotes (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,                 -- hf://OWNER/REPO or http(s)://HOST/OWNER/REPO; never a token
    created TEXT NOT NULL
);
CREATE TABLE remote_branches (         -- what kedit last saw of a Hub branch (kedit tip: the ref)
    remote TEXT NOT NULL REFERENCES remotes(name) ON DELETE CASCADE,
    branch TEXT NOT NULL,
    hub_commit TEXT NOT NULL,          -- the Hub commit sha: parent_commit of the next push
    checkpoint_commit TEXT,            -- the kedit commit whose weights the branch's files hold
    updated TEXT NOT NULL,
    PRIMARY KEY (remote, branch)
);
"""

# A method's memory: tensors an edit keeps for the method's later edits (AlphaEdit: the keys it
# wrote). Read back only for commits whose deltas are still in effect, so a revert forgets them.
_METHOD_MEMORY = """
CREATE TABLE method_memory (
    commit_id TEXT PRIMARY KEY REFERENCES commits(id) ON DELETE CASCADE,
    method TEXT NOT NULL,
    object_id TEXT NOT NULL
);
"""

# Trained editors (MEND, InstructEdit): the weights are an object (id = its hash); this records
# what they were trained for and on, and how well they did. Commits name the editor they used.
_EDITORS = """
CREATE TABLE editors (
    id TEXT PRIMARY KEY,               -- the object id of the editor's weights
    method TEXT NOT NULL,              -- mend | instructedit
    base_commit TEXT NOT NULL,         -- the base model it was trained for
    data_hash TEXT NOT NULL,           -- xxh3_128 of its training and validation records
    hparams TEXT NOT NULL,             -- JSON: training hyper-parameters
    metrics TEXT NOT NULL,             -- JSON: validation metrics, steps, training time
    created TEXT NOT NULL
);
"""

# Metrics are not hashed into a commit's id: record where each came from, so that fsck (and
# show) can tell a measurement made here from one a remote claims. '' = measured here.
_METRIC_SOURCE = "ALTER TABLE metrics ADD COLUMN source TEXT NOT NULL DEFAULT ''"

# The NAME of the environment variable that holds a remote's token (`--token-env`), for a remote
# whose host is not HF_ENDPOINT's: the token itself is never stored.
_REMOTE_TOKEN_ENV = "ALTER TABLE remotes ADD COLUMN token_env TEXT;"

# Every parent of a commit, in order (seq 0 is `commits.parent`, the first parent): a merge commit has
# two. Filled from `commits.parent` for repositories written before merges. The parent reference is
# checked at the end of the transaction, so that fetch may insert a merge before its second parent.
_COMMIT_PARENTS = """
CREATE TABLE commit_parents (
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    parent_id TEXT NOT NULL REFERENCES commits(id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (commit_id, seq)
);
CREATE INDEX commit_parents_parent ON commit_parents(parent_id);
INSERT INTO commit_parents (commit_id, seq, parent_id) SELECT id, 0, parent FROM commits WHERE parent IS NOT NULL;
"""

# A batch edit's scores of each of its requests get their own column: `request` is the request's
# index in the commit (NULL: a score of the whole commit). Earlier kedits stored them under the suite
# "request <i>"; those rows become suite '' (the edit's own requests, as the whole-commit scores) with
# request = i. The key holds request too (NULL counted as one value), so the table is rebuilt.
_METRIC_REQUEST = """
CREATE TABLE metrics_new (
    commit_id TEXT NOT NULL REFERENCES commits(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    protocol TEXT NOT NULL,
    stage TEXT NOT NULL,
    suite TEXT NOT NULL DEFAULT '',
    request INTEGER,                   -- the request's index in its commit; NULL: the whole commit
    created TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT ''
);
INSERT INTO metrics_new (commit_id, name, value, protocol, stage, suite, request, created, source)
    SELECT commit_id, name, value, protocol, stage,
           CASE WHEN suite GLOB 'request [0-9]*' AND substr(suite, 9) NOT GLOB '*[^0-9]*' THEN '' ELSE suite END,
           CASE WHEN suite GLOB 'request [0-9]*' AND substr(suite, 9) NOT GLOB '*[^0-9]*'
                THEN CAST(substr(suite, 9) AS INTEGER) END,
           created, source FROM metrics;
DROP TABLE metrics;
ALTER TABLE metrics_new RENAME TO metrics;
CREATE UNIQUE INDEX metrics_key ON metrics(commit_id, name, stage, suite, ifnull(request, -1));
"""

# Named migrations; each runs once, inside a transaction, and is recorded by name in
# `_kedit_migrations` (never rename one: users' databases hold these names). The ones a database
# lacks run in this order, the numeric one. Earlier kedits listed them 0001, 0002, 0004, 0005, 0003,
# so a database may hold any subset; numeric order is safe for every subset because each migration
# needs only lower-numbered ones (0005, 0006 and 0008 use 0001's tables, 0007 alters 0004's, 0009
# rebuilds 0001's metrics with 0006's column) and 0003 (a table of its own) needs none after 0001.
MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", _SCHEMA_V1),
    ("0002_probes", _PROBES),
    ("0003_editors", _EDITORS),
    ("0004_remotes", _REMOTES),
    ("0005_method_memory", _METHOD_MEMORY),
    ("0006_metric_source", _METRIC_SOURCE),
    ("0007_remote_token_env", _REMOTE_TOKEN_ENV),
    ("0008_commit_parents", _COMMIT_PARENTS),
    ("0009_metric_request", _METRIC_REQUEST),
]


REPO_DIR = ".kedit"
DB_FILE = "kedit.db"


def find_repository(start: Path) -> Path:
    """The `.kedit` directory for `start`: itself, inside it, or inside one of its parents."""
    start = start.resolve()
    if (start / DB_FILE).exists():
        return start
    for folder in (start, *start.parents):
        if (folder / REPO_DIR / DB_FILE).exists():
            return folder / REPO_DIR
        if (folder / REPO_DIR).is_dir():  # killed before init created the database
            raise IncompleteRepositoryError(folder / REPO_DIR)
    raise RepositoryNotFoundError(f"not a kedit repository (or any parent up to /): {start}")


class Database:
    """A connection to the history database: `execute` for queries, `conn` for the transaction
    state, and sqlite-utils' table helpers (`db["commits"].insert(row)`) for the writers.

    sqlite-utils is imported on the first `db[table]`, not before: importing it takes longer
    (0.14 s) than the commands that only read the history (log, show, status) take in all.
    """

    def __init__(self, conn: sqlite3.Connection, *, read_only: bool = False) -> None:
        self.conn = conn
        self.read_only = read_only  # write() refuses
        self._tables: sqlite_utils.Database | None = None

    def execute(self, sql: str, parameters: Sequence | dict[str, Any] | None = None) -> sqlite3.Cursor:
        return self.conn.execute(sql) if parameters is None else self.conn.execute(sql, parameters)

    def table_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    def _table_api(self) -> sqlite_utils.Database:
        if self._tables is None:
            import sqlite_utils  # here, not at the top: see the class docstring

            self._tables = sqlite_utils.Database(self.conn)
        return self._tables

    def __getitem__(self, table: str) -> sqlite_utils.db.Table | sqlite_utils.db.View:
        return self._table_api()[table]

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Database]:
        """A transaction, or a savepoint inside one (sqlite-utils' `atomic`)."""
        with self._table_api().atomic():
            yield self


def connect(path: Path, *, create: bool = False) -> Database:
    """Open the history database, configured for kedit, with its schema up to date."""
    if not create and not path.exists():
        raise FileNotFoundError(path)
    if not create and not writable(path):
        return _connect_read_only(path)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    # before WAL: switching the journal mode takes a lock, which a second process must wait for, not fail on
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")  # the commit log must survive a power cut
    conn.execute("PRAGMA foreign_keys = ON")
    db = Database(conn)
    migrate(db)
    return db


def writable(path: Path) -> bool:
    """Whether this process may write the database: the file, and its folder (WAL's -wal and -shm files)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _connect_read_only(path: Path) -> Database:
    from urllib.parse import quote

    uri = f"file:{quote(str(path.resolve()))}"
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:  # WAL mode, and no -shm file we may create: read the file as it stands
        conn.close()
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise ReadOnlyRepositoryError(
                f"{path} is read-only for this user and has commits in its write-ahead log that only a user who "
                "can write it can bring in", hint="run any kedit command there once as that user") from None
        conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db = Database(conn, read_only=True)
    applied = ({row[0] for row in db.execute("SELECT name FROM _kedit_migrations")}
               if "_kedit_migrations" in db.table_names() else set())
    if applied != {name for name, _ in MIGRATIONS}:
        raise ReadOnlyRepositoryError(f"{path} needs a schema upgrade that a read-only repository cannot be given",
                                      hint="run any kedit command there once as a user who can write it")
    return db


def migrate(db: Database) -> None:
    known = {name for name, _ in MIGRATIONS}
    if "_kedit_migrations" in db.table_names():  # the common case: readers take no write lock
        applied = {row[0] for row in db.execute("SELECT name FROM _kedit_migrations").fetchall()}
        if applied == known:
            return
    with write(db):
        db.execute("CREATE TABLE IF NOT EXISTS _kedit_migrations (name TEXT PRIMARY KEY, applied TEXT)")
        applied = {row[0] for row in db.execute("SELECT name FROM _kedit_migrations").fetchall()}
        unknown = applied - known
        if unknown:
            raise SchemaError(f"this repository was written by a newer kedit (migrations {sorted(unknown)})",
                              hint="upgrade kedit: pip install -U kedit")
        for name, sql in MIGRATIONS:
            if name not in applied:
                for statement in _statements(sql):
                    db.execute(statement)
                db.execute("INSERT INTO _kedit_migrations VALUES (?, datetime('now'))", [name])


def _statements(sql: str) -> Iterator[str]:
    # executescript() would COMMIT the open transaction, so run statements one by one.
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    for statement in "\n".join(lines).split(";"):
        if statement.strip():
            yield statement


@contextlib.contextmanager
def write(db: Database) -> Iterator[Database]:
    """A write transaction that takes the write lock up front (BEGIN IMMEDIATE)."""
    if db.read_only:
        raise ReadOnlyRepositoryError("the repository is read-only for this user: this command writes to it")
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def put_metrics(db: Database, commit_id: str, metrics: Iterable[Mapping[str, Any]], *, source: str) -> None:
    """Store (or replace: same name, stage, suite and request) a commit's metrics; call inside `write`."""
    db.conn.executemany(
        "INSERT OR REPLACE INTO metrics (commit_id, name, value, protocol, stage, suite, request, created, source) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(commit_id, m["name"], m["value"], m["protocol"], m["stage"], m["suite"], m.get("request"), m["created"],
          source) for m in metrics])


def one(db: Database, sql: str, params: list | tuple = ()) -> tuple | None:
    return db.execute(sql, list(params)).fetchone()


def rows(db: Database, sql: str, params: list | tuple = (),
         factory: Callable | None = None) -> list:
    cursor = db.execute(sql, list(params))
    if factory is None:
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    return [factory(*row) for row in cursor.fetchall()]
