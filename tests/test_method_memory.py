"""A method's memory (AlphaEdit's earlier keys) follows the history: restarts keep it, reverts drop it."""

import torch

from kedit.core.delta import LowRank
from kedit.core.maintenance import fsck
from kedit.core.repo import Repository

NAME = "model.layers.1.mlp.down_proj.weight"


def edit(repo: Repository, seed: int, with_memory: bool = True):
    g = torch.Generator().manual_seed(seed)
    delta = LowRank(torch.randn(32, 1, generator=g), torch.randn(1, 64, generator=g) * 0.01)
    memory = {"keys.1": torch.full((64, 1), float(seed))} if with_memory else None
    return repo.commit({NAME: delta}, method="alphaedit", memory=memory, message=f"edit {seed}")


def seeds(memories: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(m["keys.1"][0, 0]) for m in memories]


def test_memory_of_edits_in_effect_oldest_first(repo):
    for seed in (1, 2, 3):
        edit(repo, seed)
    assert seeds(repo.memory("alphaedit")) == [1, 2, 3]
    assert repo.memory("memit") == []
    assert seeds(repo.memory("alphaedit", "HEAD~1")) == [1, 2]
    reopened = Repository.open(repo.path.parent)  # not process memory
    assert seeds(reopened.memory("alphaedit")) == [1, 2, 3]


def test_revert_drops_the_reverted_edits_memory_and_revert_of_revert_restores_it(repo):
    first = edit(repo, 1)
    edit(repo, 2)
    reverted = repo.revert(first.id)
    assert seeds(repo.memory("alphaedit")) == [2]
    repo.revert(reverted.id)
    assert seeds(repo.memory("alphaedit")) == [1, 2]
    report = fsck(repo)
    assert report.ok, report.errors


def test_fsck_reports_a_lost_memory_object(repo):
    commit = edit(repo, 5)
    (oid,) = repo.db.execute("SELECT object_id FROM method_memory WHERE commit_id = ?", [commit.id]).fetchone()
    assert repo.store.get_tensors(oid)[0]["keys.1"][0, 0] == 5
    repo.store.path(oid, "st").unlink()
    report = fsck(repo)
    assert not report.ok and any(commit.id[:12] in e for e in report.errors)
