"""Merge commits, `kedit merge` (compose) and `kedit cherry-pick` on a tiny Llama, no model run.

Edits here are stored low-rank deltas whose row directions are chosen: orthogonal ones touch
different keys (no conflict), a shared one moves the other's key (a conflict).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core import history
from kedit.core.conflicts import overlap
from kedit.core.delta import Dense, LowRank, apply_step
from kedit.core.errors import KeditError, MergeConflictError
from kedit.core.maintenance import fsck, gc
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor
from kedit.hub.layout import FORMAT
from tests import test_cli_edit, test_hub
from tests.hubserver import HubServer
from tests.jsondoc import doc

hub = test_hub.hub  # a running local Hub server (tests/hubserver.py)
tiny_repo = test_cli_edit.tiny_repo  # a repository of a tiny Llama with a tokenizer

DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


def kedit(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def direction(repo: Repository, name: str, i: int, seed: int, scale: float = 0.05) -> LowRank:
    """A rank-one delta reading along the basis direction i (orthogonal for different i)."""
    rows, cols = repo.manifest()[name].shape
    a = torch.randn(rows, 1, generator=torch.Generator().manual_seed(seed)) * scale
    b = torch.zeros(1, cols)
    b[0, i % cols] = 1.0
    return LowRank(a, b)


def edit(repo: Repository, name: str, delta: LowRank, subject: str, target: str = "Rome",
         prompt: str = "{} is in") -> str:
    request = {"prompt": prompt, "subject": subject, "target_new": target}
    return repo.commit({name: delta}, method="rome", requests=[request], message=f"{subject} -> {target}").id


def hashes(repo: Repository, rev: str) -> dict[str, str]:
    return {n: e.hash for n, e in repo.manifest(rev).items()}


@pytest.fixture
def sides(repo: Repository) -> dict[str, object]:
    """main and exp diverging after one shared edit: two edits each, one tensor edited on both."""
    shared = edit(repo, DOWN0, direction(repo, DOWN0, 0, 1), "Paris")
    repo.create_branch("exp")
    steps: dict[str, list[tuple[str, LowRank]]] = {"main": [], "exp": []}
    for branch, plan in (("main", [(DOWN0, 1, 2, "Berlin"), (DOWN1, 2, 3, "Oslo")]),
                         ("exp", [(DOWN0, 5, 4, "Lima"), (UP0, 6, 5, "Quito")])):
        repo.checkout(branch)
        for name, i, seed, subject in plan:
            delta = direction(repo, name, i, seed)
            steps[branch].append((name, delta))
            edit(repo, name, delta, subject)
    repo.checkout("main")
    return {"shared": shared, "main": repo.head(), "exp": repo.resolve("exp"), "steps": steps}


def test_compose_merge_is_the_fold_of_both_sides_bit_for_bit(repo: Repository, sides: dict) -> None:
    result = repo.merge("exp")
    assert result.status == "merged" and repo.head() == result.head and result.base == sides["shared"]
    merge = repo.get_commit(result.head)
    assert merge.kind == "merge" and merge.parents == [sides["main"], sides["exp"]]
    assert merge.message == "Merge branch 'exp'"
    # The fold: the merge base's values, then main's deltas, then exp's, each oldest first.
    state = repo.materialize(sides["shared"])
    for name, delta in sides["steps"]["main"] + sides["steps"]["exp"]:
        state[name] = apply_step(state[name], delta)
    assert {n: hash_tensor(v) for n, v in state.items()} == hashes(repo, "HEAD")
    assert {n: hash_tensor(v) for n, v in repo.materialize("HEAD").items()} == hashes(repo, "HEAD")
    assert history.edits_in_effect(repo.db, repo.head()) >= {sides["shared"], *repo._side(sides["shared"], "exp")}
    assert not repo.status()["modified"] and repo.worktree.commit == repo.head()


def test_reverting_one_side_after_the_merge_gives_the_other_side(repo: Repository, sides: dict) -> None:
    merged = repo.merge("exp").head
    for side, other in (("exp", "main"), ("main", "exp")):
        repo.reset(merged)
        for cid in reversed(repo._side(sides["shared"], sides[side])):
            repo.revert(cid)
        assert hashes(repo, "HEAD") == hashes(repo, sides[other]), f"reverting {side}'s edits"
        assert not set(repo._side(sides["shared"], sides[side])) & history.edits_in_effect(repo.db, repo.head())


def test_a_merge_is_reverted_through_the_edits_it_brought(repo: Repository, sides: dict) -> None:
    merged = repo.merge("exp").head
    with pytest.raises(KeditError, match="is a merge") as caught:
        repo.revert(merged)
    assert f"kedit log {merged[:12]}^1..{merged[:12]}^2" in caught.value.hint
    assert repo.head() == merged


def test_fast_forward_and_no_ff(repo: Repository) -> None:
    edit(repo, DOWN0, direction(repo, DOWN0, 0, 1), "Paris")
    before = repo.head()
    repo.create_branch("exp")
    repo.checkout("exp")
    ahead = edit(repo, DOWN1, direction(repo, DOWN1, 1, 2), "Oslo")
    repo.checkout("main")
    assert repo.merge("main").status == "up-to-date"
    count = repo.count_commits()
    result = repo.merge("exp")
    assert (result.status, repo.head(), repo.count_commits()) == ("fast-forward", ahead, count)
    assert repo.worktree.commit == ahead and not repo.status()["modified"]
    repo.reset(before)
    forced = repo.merge("exp", no_ff=True)
    assert forced.status == "merged" and repo.get_commit(forced.head).parents == [before, ahead]
    assert hashes(repo, "HEAD") == hashes(repo, ahead)


def test_conflicting_requests_stop_the_merge_and_change_nothing(repo: Repository) -> None:
    edit(repo, DOWN0, direction(repo, DOWN0, 0, 1), "Paris")
    repo.create_branch("exp")
    ours = edit(repo, DOWN0, direction(repo, DOWN0, 1, 2), "Eiffel Tower", "Rome")
    repo.checkout("exp")
    theirs = edit(repo, DOWN1, direction(repo, DOWN1, 2, 3), "Eiffel Tower", "Berlin")
    repo.checkout("main")
    head, count, reflog = repo.head(), repo.count_commits(), len(repo.reflog())
    with pytest.raises(MergeConflictError) as caught:
        repo.merge("exp")
    (conflict,) = caught.value.conflicts
    assert (conflict.kind, conflict.ours, conflict.theirs) == ("request", ours, theirs)
    assert (repo.head(), repo.count_commits(), len(repo.reflog())) == (head, count, reflog)
    out = kedit(repo, "merge", "exp", code=1)
    assert "CONFLICT: 1" in out and f"ours {ours[:12]}" in out and "'Eiffel Tower is in': 'Rome' here, 'Berlin'" in out
    report = doc(kedit(repo, "merge", "exp", "--json", code=1))
    assert report["status"] == "conflict" and report["conflicts"][0]["theirs"] == theirs
    assert (repo.head(), repo.count_commits()) == (head, count)
    # --take ours leaves their conflicting edit out; --take theirs leaves ours out.
    taken = doc(kedit(repo, "merge", "exp", "--take", "ours", "--json"))
    assert taken["status"] == "merged" and taken["left_out"] == [theirs]
    assert hashes(repo, "HEAD") == hashes(repo, head)
    assert theirs not in history.edits_in_effect(repo.db, repo.head())
    repo.reset(head)
    repo.merge("exp", take="theirs")
    assert hashes(repo, "HEAD") == hashes(repo, "exp")
    assert ours not in history.edits_in_effect(repo.db, repo.head())


@pytest.fixture
def two_conflicts(repo: Repository) -> dict[str, str]:
    """Paris and Berlin each set to one target on main and another on exp (orthogonal keys: request
    conflicts only)."""
    shared = edit(repo, DOWN0, direction(repo, DOWN0, 0, 1), "Oslo")
    repo.create_branch("exp")
    made = {"shared": shared}
    for branch, plan in (("main", [("ours_paris", DOWN0, 1, "Paris", "Rome"),
                                   ("ours_berlin", DOWN1, 2, "Berlin", "Bonn")]),
                         ("exp", [("theirs_paris", DOWN0, 5, "Paris", "Lyon"),
                                  ("theirs_berlin", DOWN1, 6, "Berlin", "Kiel")])):
        repo.checkout(branch)
        for key, name, i, subject, target in plan:
            made[key] = edit(repo, name, direction(repo, name, i, i + 10), subject, target)
    repo.checkout("main")
    made["main"], made["exp"] = repo.head(), repo.resolve("exp")
    return made


def test_take_by_subject_resolves_each_conflict_its_own_way(repo: Repository, two_conflicts: dict) -> None:
    c = two_conflicts
    result = repo.merge("exp", take_subjects={"Paris": "ours", "Berlin": "theirs"})
    assert result.status == "merged" and sorted(result.left_out) == sorted([c["theirs_paris"], c["ours_berlin"]])
    assert sorted(result.took) == [("ours", "Paris"), ("theirs", "Berlin")]
    assert {(x.subjects, x.kind) for x in result.conflicts} == {(("Paris",), "request"), (("Berlin",), "request")}
    # The merge state is the composition of the chosen edits: the base, our Paris, their Berlin.
    merged = result.head
    repo.create_branch("chosen", c["shared"])
    repo.checkout("chosen")
    repo.cherry_pick(c["ours_paris"])
    repo.cherry_pick(c["theirs_berlin"])
    assert hashes(repo, merged) == hashes(repo, "chosen")
    assert history.edits_in_effect(repo.db, merged) >= {c["ours_paris"], c["theirs_berlin"]}
    assert not {c["theirs_paris"], c["ours_berlin"]} & history.edits_in_effect(repo.db, merged)
    resolved = repo.get_commit(merged).info["resolved"]
    assert resolved["take_subjects"] == {"Paris": "ours", "Berlin": "theirs"} and resolved["take"] is None
    assert {(x["subjects"][0], x["took"], x["by"]) for x in resolved["conflicts"]} == \
        {("Paris", "ours", "Paris"), ("Berlin", "theirs", "Berlin")}
    assert fsck(repo).ok
    # The CLI says the same, and a plain --take covers what no subject names.
    repo.checkout("main")
    repo.reset(c["main"])
    out = doc(kedit(repo, "merge", "exp", "--take", "Berlin=theirs", "--take", "ours", "--json"))
    assert out["status"] == "merged" and hashes(repo, "HEAD") == hashes(repo, merged)
    assert {(x["subjects"][0], x["took"], x["by"]) for x in out["conflicts"]} == \
        {("Paris", "ours", None), ("Berlin", "theirs", "Berlin")}
    repo.reset(c["main"])
    said = CliRunner().invoke(cli, ["--repo", str(repo.root), "merge", "exp", "--take", "Paris=theirs",
                                    "--take", "Berlin=ours"])
    assert said.exit_code == 0 and "(--take Paris=theirs)" in said.stderr and "(--take Berlin=ours)" in said.stderr


def test_take_by_subject_refuses_what_it_does_not_cover(repo: Repository, two_conflicts: dict) -> None:
    c = two_conflicts
    before = (repo.head(), repo.count_commits(), len(repo.reflog()), repo.refs.branches(), hashes(repo, "HEAD"))

    def unchanged() -> bool:
        return (repo.head(), repo.count_commits(), len(repo.reflog()), repo.refs.branches(),
                hashes(repo, "HEAD")) == before

    with pytest.raises(MergeConflictError) as caught:
        repo.merge("exp", take_subjects={"Paris": "theirs"})
    (left,) = caught.value.conflicts
    assert (left.subjects, left.ours, left.theirs, caught.value.total) == (("Berlin",), c["ours_berlin"],
                                                                          c["theirs_berlin"], 2)
    assert unchanged()
    out = kedit(repo, "merge", "exp", "--take", "Paris=theirs", code=1)
    assert "CONFLICT: 1 of 2 conflicting edit pair(s) not covered by --take" in out and "[Berlin]" in out
    assert c["ours_berlin"][:12] in out and c["ours_paris"][:12] not in out
    report = doc(kedit(repo, "merge", "exp", "--take", "Paris=theirs", "--json", code=1))
    assert report["status"] == "conflict" and [x["subjects"] for x in report["conflicts"]] == [["Berlin"]]
    assert unchanged()
    # A subject that names no conflict (matching is exact and case-sensitive), a bad side, a subject
    # given both sides: one line each, nothing changed.
    for args, says in ((["--take", "paris=ours", "--take", "Berlin=ours"], "no conflict of this merge has"),
                       (["--take", "Rome=ours", "--take", "ours"], "'Rome'"),
                       (["--take", "Paris=mine"], "is not ours, theirs or SUBJECT=ours|theirs"),
                       (["--take", "=ours"], "is not ours, theirs"),
                       (["--take", "Paris=ours", "--take", "Paris=theirs"], "both ours and theirs"),
                       (["--take", "ours", "--take", "theirs"], "one plain --take")):
        result = CliRunner().invoke(cli, ["--repo", str(repo.root), "merge", "exp", *args])
        assert result.exit_code != 0 and result.stderr.count("\n") == 1, (args, result.stdout + result.stderr)
        assert says in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert unchanged()
    with pytest.raises(KeditError, match="case-sensitive"):
        repo.merge("exp", take_subjects={"PARIS": "ours", "Berlin": "ours"})
    with pytest.raises(KeditError, match="ours or theirs"):
        repo.merge("exp", take_subjects={"Paris": "both"})
    with pytest.raises(KeditError, match="name a subject"):
        repo.merge("exp", take_subjects={" ": "ours"})
    assert unchanged()
    # A subject given to a merge with no conflicts at all (here a fast-forward) names none either.
    repo.create_branch("ahead", "exp")
    repo.checkout("exp")
    with pytest.raises(KeditError, match="no conflict of this merge"):
        repo.merge("ahead", take_subjects={"Paris": "ours"})


def test_take_by_subject_refuses_choices_that_contradict(repo: Repository) -> None:
    """One commit of ours sets Paris and Berlin; keeping it for Paris and leaving it out for Berlin cannot both hold."""
    repo.create_branch("exp")
    both = [{"prompt": "{} is in", "subject": s, "target_new": t} for s, t in (("Paris", "Rome"), ("Berlin", "Bonn"))]
    repo.commit({DOWN0: direction(repo, DOWN0, 1, 2)}, method="rome", requests=both, message="two facts")
    repo.checkout("exp")
    edit(repo, DOWN0, direction(repo, DOWN0, 5, 3), "Paris", "Lyon")
    edit(repo, DOWN1, direction(repo, DOWN1, 6, 4), "Berlin", "Kiel")
    repo.checkout("main")
    head = repo.head()
    with pytest.raises(KeditError, match=r"keep commit \w+ for one conflict and leave it out for another"):
        repo.merge("exp", take_subjects={"Paris": "ours", "Berlin": "theirs"})
    assert repo.head() == head
    assert repo.merge("exp", take_subjects={"Paris": "ours", "Berlin": "ours"}).status == "merged"


def test_edits_that_move_each_others_key_conflict(repo: Repository) -> None:
    repo.create_branch("exp")
    same = direction(repo, DOWN0, 3, 1)
    ours = edit(repo, DOWN0, same, "Paris")
    repo.checkout("exp")
    theirs = edit(repo, DOWN0, direction(repo, DOWN0, 3, 2), "Lima")
    edit(repo, DOWN0, direction(repo, DOWN0, 4, 3), "Quito")  # an orthogonal key: no conflict
    repo.checkout("main")
    with pytest.raises(MergeConflictError) as caught:
        repo.merge("exp")
    (conflict,) = caught.value.conflicts
    assert (conflict.kind, conflict.ours, conflict.theirs, conflict.tensor) == ("key_overlap", ours, theirs, DOWN0)
    assert conflict.overlap > 0.3
    assert "CONFLICT" in kedit(repo, "merge", "exp", code=1)
    assert kedit(repo, "merge", "exp", "--threshold", "1e6", "--json")  # a looser threshold lets it through


def test_overlap_is_the_rank_one_key_ratio_and_general_in_rank() -> None:
    g = torch.Generator().manual_seed(0)
    u, v, a1, a2 = (torch.randn(*shape, generator=g, dtype=torch.float64)
                    for shape in ((8, 1), (1, 12), (8, 2), (2, 12)))
    a = LowRank(a1, a2)
    k = v[0] / v.norm()
    dense_a = a.a @ a.b
    expected = float((dense_a @ k).norm() / ((u @ v) @ k).norm())  # ‖Δa·k_b‖ / ‖Δb·k_b‖, k_b = b's key
    assert overlap(a, LowRank(u, v)) == pytest.approx(expected, rel=1e-9)
    assert overlap(Dense(dense_a), LowRank(u, v)) == pytest.approx(expected, rel=1e-9)
    assert overlap(LowRank(u, v), LowRank(u, v)) == pytest.approx(1.0)


def test_merge_commits_are_proved_by_fsck_kept_by_gc_and_drawn_by_log(repo: Repository, sides: dict) -> None:
    merged = repo.merge("exp").head
    report = fsck(repo)
    assert report.ok, report.errors
    repo.delete_branch("exp")
    from datetime import timedelta
    gc(repo, grace=timedelta(0))
    assert {sides["exp"], *repo._side(sides["shared"], sides["exp"])} <= history.reachable(repo.db, [merged])
    assert fsck(repo).ok
    assert (repo.resolve("HEAD^2"), repo.resolve("HEAD^"), repo.resolve("HEAD^1~1"), repo.resolve("HEAD^0")) == \
        (sides["exp"], sides["main"], repo.resolve("main~2"), merged)
    with pytest.raises(KeditError, match="no parent number 3"):
        repo.resolve("HEAD^3")
    shown = kedit(repo, "show", "HEAD")
    assert f"Parents: {sides['main']} {sides['exp']}" in shown
    assert f"Merge:  {sides['main'][:12]} {sides['exp'][:12]}" in kedit(repo, "log", "-n", "1")
    graph = kedit(repo, "log", "--graph", "--oneline").splitlines()
    assert graph[0].startswith("* ") and merged[:12] in graph[0]
    assert graph[1] == "| \\"  # the second parent's lane opens right of the merge
    drawn = "\n".join(graph)
    assert all(c[:12] in drawn for c in history.reachable(repo.db, [merged]))
    # Both parents listed before the merge base; the base drawn once, where the lanes join.
    assert sum(sides["shared"][:12] in line for line in graph) == 1 and "| /" in graph
    log = doc(kedit(repo, "log", "--json"))["commits"]
    assert log[0]["parents"] == [sides["main"], sides["exp"]]
    assert {c["id"] for c in log} == history.reachable(repo.db, [merged])
    assert {c["id"] for c in doc(kedit(repo, "log", f"{sides['main']}..HEAD", "--json"))["commits"]} == \
        {merged, *repo._side(sides["shared"], sides["exp"])}


def test_fsck_names_a_forged_second_parent(repo: Repository, sides: dict) -> None:
    merged = repo.merge("exp").head
    with repo.db.conn:
        repo.db.execute("UPDATE commit_parents SET parent_id = ? WHERE commit_id = ? AND seq = 1",
                        [sides["shared"], merged])
    errors = fsck(repo).errors
    assert any("its parent rows name" in e and merged[:12] in e for e in errors), errors
    from kedit.core.maintenance import repair
    assert repair(repo).ok
    assert repo.get_commit(merged).parents == [sides["main"], sides["exp"]]


def test_cherry_pick_composes_one_edit_and_names_it(repo: Repository, sides: dict) -> None:
    lima = repo._side(sides["shared"], sides["exp"])[0]
    picked = repo.cherry_pick(lima)
    assert picked.parents == [sides["main"]] and picked.info["cherry_picked_from"] == lima
    record = json.loads(repo.db.execute("SELECT record FROM commits WHERE id = ?", [picked.id]).fetchone()[0])
    assert record["picked_from"] == lima and picked.requests == repo.get_commit(lima).requests
    name, delta = sides["steps"]["exp"][0]
    assert hashes(repo, "HEAD")[name] == hash_tensor(apply_step(repo.materialize(sides["main"], [name])[name], delta))
    with pytest.raises(KeditError, match="already in the history"):
        repo.cherry_pick(picked.id)
    out = doc(kedit(repo, "cherry-pick", "exp", "--json"))
    assert out["picked_from"] == sides["exp"]
    merged = repo.merge("exp", take="ours")
    assert merged.status == "merged"
    assert "only edit commits" in CliRunner().invoke(cli, ["--repo", str(repo.root), "cherry-pick", "HEAD"]).stderr


def test_cherry_pick_carries_the_picked_commits_probes_to_check(tiny_repo: Repository) -> None:
    from tests.test_cli_edit import EDIT

    repo = tiny_repo
    repo.create_branch("exp")
    kedit(repo, *EDIT, "--set", "mom2_adjustment=false", "--no-eval")  # The capital city is France -> Japan
    picked = repo.head()
    held = sorted((p["kind"], p["prompt"], p["answer"]) for p in doc(kedit(repo, "probe", "list", "--json"))["probes"]
                  if p["commit_id"] == picked)
    assert held and all(kind == "edit" for kind, _, _ in held)

    def check() -> dict:  # exit 1 when a probe broke: the damaged tiny model's locality may
        result = CliRunner().invoke(cli, ["--repo", str(repo.root), "check", "--json"])
        assert result.exit_code in (0, 1) and "Traceback" not in result.stderr, result.stderr
        return doc(result.stdout)

    at_picked = {r["probe"]["prompt"]: r["now"] for r in check()["results"]}
    repo.checkout("exp")
    out = doc(kedit(repo, "cherry-pick", "main", "--json"))
    new = out["commit"]["id"]
    assert out["picked_from"] == picked and out["probes"] == len(held)
    probes = doc(kedit(repo, "probe", "list", "--json"))["probes"]
    assert sorted((p["kind"], p["prompt"], p["answer"]) for p in probes if p["commit_id"] == new) == held
    # kedit check at the new commit runs the picked commit's edit probes and reports them.
    report = check()
    assert report["commit"] == new
    ran = {r["probe"]["prompt"]: r for r in report["results"] if r["probe"]["commit_id"] == new}
    assert sorted(ran) == sorted(prompt for _, prompt, _ in held)
    assert hashes(repo, new) == hashes(repo, picked)  # the same edit on the same base: the same scores
    assert {p: r["now"] for p, r in ran.items()} == {p: at_picked[p] for p in ran}
    assert all(r["now"] == 1.0 and not r["broke"] for r in ran.values())
    assert fsck(repo).ok


def test_a_merge_commit_survives_push_clone_export(repo: Repository, sides: dict, hub: HubServer,
                                                   tmp_path: Path) -> None:
    merged = repo.merge("exp").head
    test_hub.run(repo.root, "remote", "add", "origin", test_hub.URL)
    test_hub.run(repo.root, "push")
    record = json.loads(hub.store.read(hub.store.tree(test_hub.REPO_ID, "main")[1][f".kedit/commits/{merged}.json"]))
    assert (record["format"], record["parents"]) == (2, [sides["main"], sides["exp"]])
    single = hub.store.tree(test_hub.REPO_ID, "main")[1][f".kedit/commits/{sides['main']}.json"]
    assert json.loads(hub.store.read(single))["format"] == 1  # what kedit 0.1 reads, unchanged
    test_hub.run(tmp_path, "clone", test_hub.URL, str(tmp_path / "copy"))
    copy = Repository.open(tmp_path / "copy")
    assert test_hub.log_json(copy.root) == test_hub.log_json(repo.root)
    assert copy.get_commit(merged).parents == [sides["main"], sides["exp"]]
    for rev in (merged, sides["exp"]):
        assert test_hub.export_hashes(copy.root, rev, tmp_path / f"c-{rev}") == \
            test_hub.export_hashes(repo.root, rev, tmp_path / f"o-{rev}")
    assert fsck(copy).ok
    # A pull brings a later merge, and a record of a newer format asks for a newer kedit.
    repo.checkout("exp")
    edit(repo, DOWN1, direction(repo, DOWN1, 9, 9), "Lisbon")
    repo.checkout("main")
    again = repo.merge("exp").head
    test_hub.run(repo.root, "push")
    assert doc(test_hub.run(copy.root, "pull", "--json"))["new"] == again
    assert hashes(copy, "HEAD") == hashes(repo, "HEAD") and fsck(copy).ok
    from huggingface_hub import CommitOperationAdd, HfApi

    path = f".kedit/commits/{again}.json"
    record = json.loads(hub.store.read(hub.store.tree(test_hub.REPO_ID, "main")[1][path]))
    record["format"] = FORMAT + 1  # newer than this kedit reads
    HfApi(endpoint=hub.url, token=test_hub.TOKEN).create_commit(
        test_hub.REPO_ID, [CommitOperationAdd(path, json.dumps(record).encode())], commit_message="from the future")
    err = test_hub.run(tmp_path, "clone", test_hub.URL, str(tmp_path / "late"), code=1)
    assert "upgrade kedit" in err and err.count("\n") == 1


@pytest.mark.parametrize("eps", ["50", "0.001"])
def test_grace_entries_merge_and_overlapping_balls_conflict(tmp_path: Path, eps: str) -> None:
    from kedit.model.load import load_revision
    from tests import test_cli_grace as g
    from tests.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(tmp_path / "model")  # a tokenizer: GRACE runs the model
    tok.save_pretrained(tmp_path / "model")
    repo = Repository.init(tmp_path / "work", str(tmp_path / "model"), progress=False)
    repo.create_branch("exp")
    france = [*g.FRANCE[:-1], f"eps_init={eps}"]
    berlin = [*g.BERLIN[:-1], f"eps_init={eps}"]
    g.run(repo, *france)
    repo.checkout("exp")
    g.run(repo, *berlin)
    repo.checkout("main")
    if eps == "50":  # each ball holds the other's key: which target a query between them gets is a choice
        out = g.run(repo, "merge", "exp", code=1)
        assert "adapter" in out and "GRACE entries 'The capital city is France' -> 'Japan' and " \
            "'Berlin is the capital of' -> 'Paris'" in out and "nothing was changed" in out
        return
    g.run(repo, "merge", "exp")
    kinds = [(ref.kind, ref.origin) for ref, _ in repo.adapters("HEAD")]
    assert kinds == [("grace", repo.resolve("HEAD^1")), ("grace", repo.resolve("HEAD^2"))]
    model, tok = load_revision(repo, repo.head())
    assert g.scores(model, tok) == [1.0, 1.0]  # both edits show in the merged model
    assert fsck(repo).ok



ITALY = ["edit", "--prompt", "The capital city is Italy", "--subject", "Italy", "--target", "Paris",
         "--set", "v_weight_decay=0", "--set", "clamp_norm_factor=50", "--set", "v_num_grad_steps=40",
         "--set", "mom2_adjustment=false", "--no-eval"]


def test_replay_merge_reruns_the_other_sides_requests_on_this_side(tiny_repo: Repository) -> None:
    from tests.test_cli_edit import EDIT

    repo = tiny_repo
    repo.create_branch("exp")
    kedit(repo, *EDIT, "--set", "mom2_adjustment=false", "--no-eval")
    ours = repo.head()
    repo.checkout("exp")
    kedit(repo, *ITALY)
    theirs = repo.head()
    repo.checkout("main")
    out = json.loads(kedit(repo, "merge", "exp", "--strategy", "replay", "--check", "--json"))
    assert out["status"] == "merged" and out["check"]["probes"] >= 2, out
    merge = repo.get_commit(out["head"])
    (replayed,) = merge.info["replayed"][theirs]
    assert merge.parents == [replayed, theirs] and repo.get_commit(replayed).parents == [ours]
    again, original = repo.get_commit(replayed), repo.get_commit(theirs)
    assert (again.method, again.hparams, again.requests) == (original.method, original.hparams, original.requests)
    assert history.edits_in_effect(repo.db, merge.id) == {ours, replayed}
    record = json.loads(repo.db.execute("SELECT record FROM commits WHERE id = ?", [merge.id]).fetchone()[0])
    assert (record["strategy"], record["dropped"], record["tensors"]) == ("replay", [theirs], {})
    assert hashes(repo, "HEAD") == hashes(repo, replayed) and fsck(repo).ok
    # Computed on a model that held ours: the delta differs from the one made on the base.
    assert repo.changes(replayed)[0].result_hash != repo.changes(theirs)[0].result_hash


def test_merge_check_undoes_a_merge_that_breaks_a_probe(tiny_repo: Repository) -> None:
    from tests.test_cli_edit import EDIT

    repo = tiny_repo
    repo.create_branch("exp")
    kedit(repo, *EDIT, "--set", "mom2_adjustment=false", "--no-eval")  # The capital city is France -> Japan
    ours = repo.head()
    repo.checkout("exp")
    kedit(repo, *[a.replace("Italy", "France") for a in ITALY])  # the same prompt and subject -> Paris
    repo.checkout("main")
    assert "request" in kedit(repo, "merge", "exp", "--strategy", "replay", code=1)
    refused = CliRunner().invoke(cli, ["--repo", str(repo.root), "merge", "exp", "--strategy", "replay",
                                       "--take", "France=theirs"])
    assert refused.exit_code == 1 and "not possible with --strategy replay" in refused.stderr
    assert repo.head() == ours
    out = json.loads(kedit(repo, "merge", "exp", "--strategy", "replay", "--take", "France=ours", "--check", "--json"))
    assert out["left_out"] == [repo.resolve("exp")]
    assert [(c["subjects"], c["took"], c["by"]) for c in out["conflicts"]] == [(["France"], "ours", "France")]
    assert repo.get_commit(out["head"]).info["resolved"]["take_subjects"] == {"France": "ours"}
    repo.reset(ours)
    # Taking theirs leaves our France edit out; the model then answers a locality probe differently.
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "merge", "exp", "--take", "theirs", "--check"])
    assert result.exit_code == 1 and "BROKE locality" in result.stdout, result.stdout + result.stderr
    assert "the branch is back at" in result.stderr and result.stderr.count("\n") == 1
    assert repo.head() == ours and repo.get_commit(repo.reflog()[0]["old"]).kind == "merge"
