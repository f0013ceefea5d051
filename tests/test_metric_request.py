"""A batch edit's score of one of its requests is a metric with `request` = its index (issue #17).

kedit 0.1 and Hub document formats 1 and 2 kept it under the suite "request <i>": migration 0009
moves such rows of a local database to the column, a fetch translates such documents, and a push
writes format 3 only for a commit that has per-request scores.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from kedit.core import db as dbm
from kedit.core.errors import HubError
from kedit.core.repo import Metric, Repository
from kedit.hub.layout import FIRST_FORMAT, FORMAT, commit_document, commit_path, document_bytes, verify_document
from tests.hubserver import HubServer
from tests.jsondoc import doc
from tests.test_hub import REPO_ID, URL, hub, origin, run  # noqa: F401 (hub and origin are fixtures)

OLD_DB = Path(__file__).resolve().parent / "fixtures" / "compat_v0_1" / "repo" / ".kedit" / dbm.DB_FILE
PER_REQUEST = [Metric("reliability", 1.0, "teacher_forced_token_acc", request=0),
               Metric("reliability", 0.5, "teacher_forced_token_acc", request=1),
               Metric("locality", 0.75, "teacher_forced_agreement", request=1)]


def _old_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT commit_id, name, stage, suite, value, source FROM metrics").fetchall()


def test_migration_moves_request_suites_to_the_column(tmp_path: Path) -> None:
    """kedit 0.1's database (MEMIT's scores under "request 0" and "request 1"): after opening, every
    metric is there once with its value, the request suites as suite '' and their number."""
    path = tmp_path / dbm.DB_FILE
    shutil.copy(OLD_DB, path)
    old = _old_rows(path)
    assert {s for *_, s, _, _ in old} >= {"request 0", "request 1"}
    db = dbm.connect(path)
    got = db.execute("SELECT commit_id, name, stage, suite, request, value, source FROM metrics").fetchall()
    expected = [(c, n, st, "", int(su.removeprefix("request ")), v, src) if su.startswith("request ")
                else (c, n, st, su, None, v, src) for c, n, st, su, v, src in old]
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    assert "0009_metric_request" in {r[0] for r in db.execute("SELECT name FROM _kedit_migrations")}


def test_recording_again_replaces_whole_commit_and_per_request_scores(repo: Repository) -> None:
    """The key counts a NULL request as one value: measuring again replaces, never duplicates."""
    whole = Metric("reliability", 0.25, "teacher_forced_token_acc")
    repo.record_metrics("HEAD", [whole, *PER_REQUEST])
    repo.record_metrics("HEAD", [Metric("reliability", 0.5, "teacher_forced_token_acc"), *PER_REQUEST])
    got = repo.get_commit(repo.head()).metrics
    assert len(got) == 4 and [m.value for m in got if m.request is None] == [0.5]
    assert [(m.request, m.name) for m in got if m.request is not None] == [(0, "reliability"), (1, "locality"),
                                                                            (1, "reliability")]


def test_per_request_scores_round_trip_through_push_and_clone(origin: Repository, hub: HubServer,  # noqa: F811
                                                             tmp_path: Path) -> None:
    batch = origin.head()
    origin.record_metrics(batch, PER_REQUEST)
    run(origin.root, "push")
    tree = hub.store.tree(REPO_ID, "main")[1]
    docs = {c.id: json.loads(hub.store.read(tree[commit_path(c.id)])) for c in origin.log()}
    assert docs[batch]["format"] == 3 and {m["request"] for m in docs[batch]["metrics"]} == {None, 0, 1}
    assert all(d["format"] == FIRST_FORMAT and all("request" not in m for m in d["metrics"])
               for cid, d in docs.items() if cid != batch)  # what an older kedit reads
    card = hub.store.read(tree["README.md"]).decode()  # the whole commit's scores, not each request's
    assert "locality 0.900, reliability 1.000 |" in card and "0.750" not in card
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    assert copy.get_commit(batch).metrics == origin.get_commit(batch).metrics
    shown = run(copy.root, "show", batch)
    assert "request 1" in shown and "reliability=0.50" in shown
    listed = doc(run(copy.root, "show", batch, "--json"))["commit"]["metrics"]
    assert {(m["name"], m["suite"], m["request"]) for m in listed} >= {("locality", "", 1), ("reliability", "", 0)}


def _as_format_1(document: dict) -> dict:
    """A document as kedit 0.1 wrote it: per-request scores under the suite "request <i>"."""
    metrics = [{k: v for k, v in m.items() if k != "request"}
               | ({"suite": f"request {m['request']}"} if m["request"] is not None else {})
               for m in document["metrics"]]
    return document | {"format": FIRST_FORMAT, "metrics": metrics}


def test_a_fetch_translates_request_suites_of_older_documents(origin: Repository, hub: HubServer,  # noqa: F811
                                                             tmp_path: Path) -> None:
    batch = origin.head()
    origin.record_metrics(batch, PER_REQUEST)
    run(origin.root, "push")
    old = document_bytes(_as_format_1(commit_document(origin, batch)))
    hub.store.commit(REPO_ID, "main", None, "as kedit 0.1 wrote it",
                     lambda tree: tree.__setitem__(commit_path(batch), hub.store.put_regular(old)))
    run(tmp_path, "clone", URL, str(tmp_path / "copy"))
    got = Repository.open(tmp_path / "copy").get_commit(batch).metrics
    assert got == origin.get_commit(batch).metrics and {m.request for m in got} == {None, 0, 1}


def test_documents_of_a_newer_format_or_with_bad_requests_are_refused(origin: Repository) -> None:  # noqa: F811
    batch = origin.head()
    origin.record_metrics(batch, PER_REQUEST)
    document = commit_document(origin, batch)
    with pytest.raises(HubError, match="upgrade kedit"):
        verify_document(document | {"format": FORMAT + 1}, batch)
    for bad in (True, -1, "0", 1.0):
        metrics = [m | {"request": bad} for m in document["metrics"]]
        with pytest.raises(HubError, match="metrics are malformed"):
            verify_document(json.loads(json.dumps(document | {"metrics": metrics})), batch)
    with pytest.raises(HubError, match="metrics are malformed"):  # a format 1 document has no request key
        verify_document(document | {"format": FIRST_FORMAT}, batch)
