"""The probe suite travels with push, clone, fetch and pull (real client, local Hub: tests/hubserver.py),
so `kedit check` in a job that only cloned finds the same probes and gives the same verdict."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kedit.core.repo import Repository
from kedit.eval.probes import add_probes
from kedit.hub.probes import PROBES_FILE
from tests.hubserver import HubServer
from tests.jsondoc import doc
from tests.test_cli_check import PROBES, damaging_edit, harmless, stdout_of
from tests.test_hub import REPO_ID, URL, hub, run  # noqa: F401  (fixtures)


def _suite(where: Path) -> list[tuple]:
    return sorted((p["kind"], p["prompt"], p["answer"], p["commit_id"])
                  for p in doc(run(where, "probe", "list", "--json"))["probes"])


def _verdict(where: Path, *args: str, code: int) -> dict:
    """A check's JSON report, its results reduced to what must agree between two repositories."""
    repo = Repository.open(where)
    report = doc(run(where, "check", "--json", *args) if code == 0
                 else stdout_of(repo, "check", "--json", *args))
    report["results"] = sorted((r["probe"]["prompt"], r["now"], r["against"], r["broke"], r["first_broke"])
                               for r in report["results"])
    return report


def test_a_clone_checks_with_the_same_probes_and_verdict(hub: HubServer, tmp_path: Path,  # noqa: F811
                                                         tiny_folder: Path) -> None:
    origin = Repository.init(tmp_path / "work", str(tiny_folder), progress=False)
    run(origin.root, "remote", "add", "origin", URL)
    gen = torch.Generator().manual_seed(0)
    harmless(origin, gen, 1)
    run(origin.root, "push")  # no probes yet: no file, as before kedit carried them
    assert PROBES_FILE not in hub.store.tree(REPO_ID, "main")[1]
    run(origin.root, *PROBES)
    good = harmless(origin, gen, 2)[-1]
    culprit = damaging_edit(origin, gen)
    add_probes(origin, [("edit", "Toko Yasuda plays the", "piano", culprit)])
    harmless(origin, gen, 3)
    run(origin.root, "push")
    assert "cloned" in run(tmp_path, "clone", URL, str(tmp_path / "ci"))
    ci = tmp_path / "ci"
    assert _suite(ci) == _suite(origin.root) and len(_suite(ci)) == 3
    # The same verdicts: a clean revision passes, the tip fails naming the same first broken commit.
    assert _verdict(ci, good, code=0) == _verdict(origin.root, good, code=0)
    failing = _verdict(ci, code=1)
    assert failing == _verdict(origin.root, code=1) and not failing["ok"]
    assert {first for *_, broke, first in failing["results"] if broke} == {culprit}
    # A probe added later arrives with pull; a removal travels with the next push.
    run(origin.root, "probe", "add", "--prompt", "Tokyo is in", "--answer", "Japan")
    run(origin.root, "push")
    run(ci, "pull")
    assert _suite(ci) == _suite(origin.root) and len(_suite(ci)) == 4
    (tokyo,) = [p for p in doc(run(origin.root, "probe", "list", "--json"))["probes"] if p["prompt"] == "Tokyo is in"]
    run(origin.root, "probe", "rm", str(tokyo["id"]))
    run(origin.root, "push")
    rows = json.loads(hub.store.read(hub.store.tree(REPO_ID, "main")[1][PROBES_FILE]))["probes"]
    assert "Tokyo is in" not in {r["prompt"] for r in rows} and len(rows) == 3


def test_a_damaged_probe_file_is_refused_and_nothing_is_fetched(hub: HubServer, tmp_path: Path,  # noqa: F811
                                                                 tiny_folder: Path) -> None:
    origin = Repository.init(tmp_path / "work", str(tiny_folder), progress=False)
    run(origin.root, "remote", "add", "origin", URL)
    run(origin.root, *PROBES)
    harmless(origin, torch.Generator().manual_seed(0), 1)
    run(origin.root, "push")
    copy = Repository.init(tmp_path / "copy", str(tiny_folder), progress=False)
    run(copy.root, "remote", "add", "origin", URL)
    from huggingface_hub import CommitOperationAdd, HfApi

    HfApi(endpoint=hub.url).create_commit(REPO_ID, [CommitOperationAdd(PROBES_FILE, json.dumps(
        {"probes": [{"kind": "rm -rf", "prompt": "x", "answer": "y", "commit": None}]}).encode())],
        commit_message="damage")
    assert "probes.json" in run(copy.root, "fetch", code=1) and "damaged" in run(copy.root, "fetch", code=1)
    assert copy.db.execute("SELECT COUNT(*) FROM probes").fetchone()[0] == 0
    assert copy.refs.deref("refs/remotes/origin/main") is None
