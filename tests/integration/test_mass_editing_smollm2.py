"""MEMIT, AlphaEdit and FT-L on the real SmolLM2-135M, through the repository as `kedit edit` runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedit.methods.base import EditRequest

from kedit.core import history
from kedit.core.delta import apply_step
from kedit.core.materialize import load_step
from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.core.tensors import hash_tensor
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.load import load_revision
from tests.integration.test_rome_smollm2 import UNRELATED

pytestmark = pytest.mark.slow

FACTS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
                target_true="Paris"),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                target_new="English", target_true="French"),
    EditRequest(prompt="Toyota was founded in the country of", subject="Toyota", target_new="Germany",
                target_true="Japan"),
    EditRequest(prompt="The Amazon River flows through the continent of", subject="Amazon River",
                target_new="Africa", target_true="South America"),
]
STATS = 64  # texts behind C (about 2,000 tokens for 1,536-wide keys); a benchmark uses more


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    folder = default_model_folder(Path("/tmp/kedit-smollm2-135m"))
    return Repository.init(tmp_path / "work", str(folder), copy=False, progress=False)


def efficacy(repo: Repository, facts: list[EditRequest]) -> list[float]:
    model, tok = load_revision(repo, "HEAD")
    return [metrics.counterfact_scores(model, tok, [f])["efficacy"].value for f in facts]


def test_memit_writes_several_facts_in_one_commit(repo: Repository) -> None:
    base = repo.head()
    model, tok = load_revision(repo, base)
    reference = metrics.locality_reference(model, tok, UNRELATED)
    facts = FACTS[:3]
    (commit,) = run_edits(repo, facts, EditOptions(method="memit", stats_samples=STATS, measure=False))
    assert commit.parent == base and len(commit.requests) == len(facts)
    assert len(repo.changes("HEAD")) == 5 and all(c.rank == len(facts) for c in repo.changes("HEAD"))
    assert efficacy(repo, facts) == [1.0] * len(facts)
    model, tok = load_revision(repo, "HEAD")
    # one of the ten facts' answer tokens may move (4 facts at once measured 0.85)
    assert metrics.locality(model, tok, UNRELATED, reference).value >= 0.8
    repo.revert("HEAD")
    assert {n: e.hash for n, e in repo.manifest().items()} == {n: e.hash for n, e in repo.manifest(base).items()}


def test_alphaedit_second_batch_reads_the_first_batch_keys_from_the_repository(repo: Repository) -> None:
    options = EditOptions(method="alphaedit", stats_samples=STATS, measure=False, batch_size=1)
    first, second = run_edits(repo, FACTS[:2], options)
    assert set(first.info["prior_keys"].values()) == {0} and set(second.info["prior_keys"].values()) == {1}
    assert efficacy(repo, FACTS[:2]) == [1.0, 1.0]
    after_second = repo.head()
    repo.revert(first.id)
    assert len(repo.memory("alphaedit")) == 1
    # the revert leaves exactly the second batch's deltas on the base
    base = history.ancestors(repo.db, after_second)[-1]
    for change in repo.changes(second.id):
        value = repo.materialize(base, names=[change.name])[change.name]
        for step in history.change(repo.db, second.id, change.name).steps:
            value = apply_step(value, load_step(repo.store, step))
        assert repo.manifest()[change.name].hash == hash_tensor(value)


def test_ft_l_stays_in_its_norm_ball(repo: Repository) -> None:
    (commit,) = run_edits(repo, FACTS[:1], EditOptions(method="ft", measure=False))
    assert commit.info["loss"][-1] < commit.info["loss"][0]
    assert max(commit.info["delta_max_abs"].values()) <= commit.hparams["norm_constraint"] * 1.0001
