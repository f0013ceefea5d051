"""A second base in one repository (`kedit init --add-base`), `kedit revert --reapply` and
`kedit rebase --onto`, on a tiny Llama with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from transformers import AutoModelForCausalLM

from kedit.cli import cli
from kedit.core import history
from kedit.core.delta import LowRank
from kedit.core.errors import KeditError, ModelSourceError
from kedit.core.maintenance import fsck
from kedit.edit import rebase as rebase_module
from kedit.edit.rebase import rerun
from kedit.edit.run import EditOptions
from kedit.repository import Repository
from tests.tiny import SENTENCES, make_model, perturbed_release

# Prompts end with their subject (see tests/test_cli_edit.py); the targets are single tokens.
FACTS = [("France", "Japan"), ("Italy", "Paris"), ("Germany", "Rome")]
STRONG = ["--set", "v_weight_decay=0", "--set", "clamp_norm_factor=50", "--set", "v_num_grad_steps=40",
          "--set", "mom2_adjustment=false", "--no-eval"]


def kedit(repo: Repository, *args: str, code: int = 0) -> str:
    result = run(repo, *args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def run(repo: Repository, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--repo", str(repo.root), *args])


def edit(repo: Repository, subject: str, target: str, *extra: str) -> str:
    kedit(repo, "edit", "--prompt", f"The capital city is {subject}", "--subject", subject, "--target", target,
          *STRONG, *extra)
    return repo.head()


# Three ROME edits that all show at once on the tiny model: on two layers, with covariance statistics.
SHOWN = [("Italy", "Paris", "0"), ("France", "Japan", "1"), ("Spain", "Paris", "1")]


def hashes(repo: Repository, rev: str) -> dict[str, str]:
    return {n: e.hash for n, e in repo.manifest(rev).items()}


@pytest.fixture
def work(tmp_path: Path, tiny_folder: Path) -> Repository:
    return Repository.init(tmp_path / "work", str(tiny_folder), progress=False)


@pytest.fixture
def perturbed(tmp_path: Path, tiny_folder: Path) -> Path:
    """The tiny model after a small change of its MLPs (a 'v1.1'), its config marked, without
    generation_config.json: a second base of the same architecture."""
    return perturbed_release(tiny_folder, tmp_path / "v1.1", seed=7, without=("generation_config.json",))


def test_add_base_shares_tensors_and_checkout_rewrites_files(work: Repository, perturbed: Path,
                                                             tmp_path: Path) -> None:
    repo = work
    first = repo.head()
    out = json.loads(kedit(repo, "init", "--add-base", str(perturbed), "--json"))
    root = out["commit"]["id"]
    assert out["branch"] == "base-2" and out["commit"]["parents"] == [] and repo.head() == first
    changed = [n for n in hashes(repo, first) if hashes(repo, first)[n] != hashes(repo, root)[n]]
    assert changed and all(".mlp." in n for n in changed)
    objects: dict[str, dict[str, str]] = {}  # per root, tensor -> stored object
    for base in (first, root):
        objects[base] = {ch.name: ch.steps[0].object_id for ch in repo.changes(base)}
    shared = [n for n in objects[root] if objects[root][n] == objects[first][n]]
    assert sorted(set(objects[root]) - set(shared)) == sorted(changed)  # unchanged tensors: one object

    folder = repo.worktree.folder
    kedit(repo, "checkout", "base-2")
    assert (folder / "config.json").read_bytes() == (perturbed / "config.json").read_bytes()
    assert not (folder / "generation_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    name = changed[0]
    assert torch.equal(loaded.state_dict()[name], repo.materialize(root, [name])[name])
    kedit(repo, "checkout", "main")
    assert "kedit_release" not in json.loads((folder / "config.json").read_text())
    assert (folder / "generation_config.json").exists() and repo.status()["modified"] == {}
    assert fsck(repo).ok


def test_add_base_refuses_another_shape_with_one_line(work: Repository, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_model("llama", 64).save_pretrained(other)  # another vocabulary: other embedding shapes
    before = (work.refs.branches(), work.count_commits())
    result = run(work, "init", "--add-base", str(other))
    assert result.exit_code != 0 and "not the same architecture" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert (work.refs.branches(), work.count_commits()) == before
    with pytest.raises(ModelSourceError, match="not the same architecture"):
        work.add_base(str(other))
    assert run(work, "init", "--branch", "x").exit_code == 2  # --branch without --add-base


def test_revert_reapply_equals_redoing_the_remaining_edits_from_scratch(work: Repository) -> None:
    repo = work
    base = repo.head()
    first, second, third = (edit(repo, s, t) for s, t in FACTS)
    out = json.loads(kedit(repo, "revert", first, "--reapply", "--json"))
    assert out["commit"]["info"]["reverts"] == first and len(out["later_reverts"]) == 2
    assert list(out["reapplied"]) == [second, third]
    again = [c for new in out["reapplied"].values() for c in new]
    assert repo.head() == again[-1] and history.edits_in_effect(repo.db, repo.head()) == set(again)
    for old, (new,) in out["reapplied"].items():
        a, b = repo.get_commit(old), repo.get_commit(new)
        assert (a.method, a.hparams, a.requests) == (b.method, b.hparams, b.requests)
    # From scratch: the remaining requests re-run on the base, in order.
    repo.create_branch("scratch", base)
    repo.checkout("scratch")
    for old in (second, third):
        rerun(repo, repo.get_commit(old), EditOptions(measure=False))
    assert hashes(repo, "scratch") == hashes(repo, "main")
    assert hashes(repo, "main") != hashes(repo, f"{third}")  # the later deltas were computed anew
    assert fsck(repo).ok


def test_revert_reapply_refuses_a_later_merge_or_revert_and_changes_nothing(work: Repository) -> None:
    repo = work
    first = edit(repo, *FACTS[0])
    second = edit(repo, *FACTS[1])
    kedit(repo, "revert", second)
    head = repo.head()
    result = run(repo, "revert", first, "--reapply")
    assert result.exit_code == 1 and "only edit commits can be re-run" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and repo.head() == head


def test_rebase_carries_three_rome_edits_onto_a_perturbed_base(work: Repository, perturbed: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    repo = work
    corpus = repo.root.parent / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 8))
    for subject, target, layer in SHOWN:
        edit(repo, subject, target, "--set", f"layer={layer}", "--set", "mom2_adjustment=true",
             "--corpus", str(corpus), "--stats-samples", "32")
    # A MEND edit (its delta committed as the engine takes one): no editor is trained for the new base.
    name = "model.layers.2.mlp.down_proj.weight"
    rows, cols = repo.manifest()[name].shape
    mend = repo.commit({name: LowRank(torch.full((rows, 1), 1e-4), torch.full((1, cols), 1e-4))}, method="mend",
                       requests=[{"prompt": "The capital city is {}", "subject": "Egypt", "target_new": "Rome"}]).id
    old_tip, old_hashes = repo.head(), hashes(repo, "main")
    branch, root = repo.add_base(str(perturbed), branch="v1.1")

    # A rebase that fails part way leaves the branch, HEAD and the working model where they were.
    calls = []

    def failing(*args, **kwargs):
        if calls:
            raise KeditError("simulated failure of the second edit")
        calls.append(1)
        return rerun(*args, **kwargs)

    monkeypatch.setattr(rebase_module, "rerun", failing)
    result = run(repo, "rebase", "--onto", "v1.1")
    assert result.exit_code == 1 and result.stderr.strip().endswith("simulated failure of the second edit")
    assert repo.head() == old_tip and repo.head_branch() == "main" and repo.status()["modified"] == {}
    assert repo.worktree.commit == old_tip
    monkeypatch.undo()
    # Refused up front, nothing changed.
    for args, says in ((["--onto", "main~1"], "already in the history"), (["--onto", "v1.1", "nope"], "no branch")):
        refused = run(repo, "rebase", *args)
        assert refused.exit_code != 0 and says in refused.stderr and refused.stderr.strip().count("\n") == 0
    assert repo.head() == old_tip

    out = json.loads(kedit(repo, "rebase", "--onto", "v1.1", "--json"))
    assert out["old"] == old_tip and out["new"] == repo.head() and repo.head_branch() == "main"
    assert [e["commit"] for e in out["edits"]] == history.ancestors(repo.db, old_tip)[:-1][::-1]
    (skipped,) = [e for e in out["edits"] if not e["carried"]]
    assert skipped["commit"] == mend and "no mend editor trained for the new base" in skipped["reason"]
    assert out["not_carried"] == [mend] and skipped["new"] == [] and skipped["check"] is None
    for e in out["edits"]:
        if e is skipped:
            continue
        assert e["carried"] and e["shown_old"] == [True] and e["shown_new"] == [True] and e["check"] == "ok", e
        a, (b,) = repo.get_commit(e["commit"]), [repo.get_commit(c) for c in e["new"]]
        assert (a.method, a.hparams, a.requests) == (b.method, b.hparams, b.requests)
    assert history.ancestors(repo.db, repo.head())[-1] == root.id and branch == "v1.1"
    assert hashes(repo, "main") != old_hashes and repo.reflog("main")[0]["old"] == old_tip
    assert out["check"]["broken"] == 0
    assert fsck(repo).ok


def _rebase_state(root: Path, old_tip: str, new_base: str, requests: list[list[dict]], label: str) -> str:
    """"old" (main at its old tip) or "new" (main a finished rebase onto `new_base`), after checking
    that HEAD is where a rebase can leave it, the working model shows no change made by hand and
    fsck is clean."""
    repo = Repository.open(root)
    try:
        tip, head, on = repo.refs.branches()["main"], repo.head(), repo.head_branch()
        assert repo.refs.branches()["v1.1"] == new_base, f"{label}: the base's branch moved"
        assert repo.status()["modified"] == {}, f"{label}: a killed rebase looks like a change made by hand"
        report = fsck(repo)
        assert report.ok, f"{label}: fsck: {report.errors}"
        if tip == old_tip:  # HEAD on main, or detached on the new base's line (the partial history)
            assert (on, head) == ("main", old_tip) or (on is None and new_base in history.reachable(repo.db, [head])), \
                f"{label}: main at its old tip, HEAD {on} {head[:12]}"
            return "old"
        line = history.ancestors(repo.db, tip)[::-1]
        assert line[0] == new_base, f"{label}: main moved, but not onto the new base"
        assert [repo.get_commit(c).requests for c in line[1:]] == requests, f"{label}: main moved half rebased"
        assert on == "main" or (on is None and head == tip), f"{label}: main rebased, HEAD {on} {head[:12]}"
        return "new"
    finally:
        repo.db.conn.close()


def test_rebase_killed_at_random_points_leaves_the_old_state_or_the_new(work: Repository, perturbed: Path,
                                                                        tmp_path: Path) -> None:
    """SIGKILL `kedit rebase --onto` at random moments: main is at its old tip or fully rebased, HEAD
    where it can be, fsck clean, and running the rebase again finishes it."""
    import os
    import random
    import time

    from tests.crashkit import Forker

    repo = work
    for subject, target in FACTS[:2]:
        edit(repo, subject, target)
    old_tip = repo.head()
    requests = [repo.get_commit(c).requests for c in history.ancestors(repo.db, old_tip)[:-1][::-1]]
    _, root = repo.add_base(str(perturbed), branch="v1.1")
    root_dir = repo.root
    repo.db.conn.close()
    args = ["--repo", str(root_dir), "rebase", "--onto", "v1.1", "main", "--no-check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KEDIT_LOCK_TIMEOUT": "30"}
    (tmp_path / "runs").mkdir()
    forker = Forker(env, tmp_path / "runs")
    rng = random.Random(20261205)

    def rebase(kill_after: float | None = None) -> tuple[bool, float]:
        started = time.monotonic()
        outcome = forker.run(args, tmp_path, kill_after, timeout=60)
        if kill_after is None:
            assert outcome.code == 0 and "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
        return outcome.killed, time.monotonic() - started

    def back_to_old() -> None:
        again = Repository.open(root_dir)
        try:
            again.checkout("main", force=True)
            again.reset(old_tip)
        finally:
            again.db.conn.close()

    try:
        _, duration = rebase()  # once to the end: how long a rebase takes
        assert _rebase_state(root_dir, old_tip, root.id, requests, "complete run") == "new"
        kills, deadline = 0, time.monotonic() + 40
        while kills < 6 and time.monotonic() < deadline:
            back_to_old()
            delay = rng.uniform(0.0, duration)
            killed, took = rebase(delay)
            label = f"kill after {delay:.2f} s" if killed else f"run that ended before its kill at {delay:.2f} s"
            state = _rebase_state(root_dir, old_tip, root.id, requests, label)
            assert killed or state == "new", label
            kills += killed
            duration = min(duration, took) if not killed else duration
            if state == "old":  # running it again finishes what the killed run began
                rebase()
                assert _rebase_state(root_dir, old_tip, root.id, requests, f"rerun after {label}") == "new"
        assert kills >= 2, f"only {kills} run(s) killed"
    finally:
        forker.close()
