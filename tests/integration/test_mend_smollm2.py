"""MEND on the real SmolLM2-135M through the engine: a short training run stores an editor, and an
edit made with it commits low-rank factors that move the model towards the new target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kedit.methods.base import EditRequest

from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.run import EditOptions, run_edits
from kedit.edit.trained import TrainOptions, list_editors, train_editor
from kedit.eval import metrics
from kedit.model.load import load_revision

pytestmark = pytest.mark.slow

FACTS = [  # (template, subject, true, counterfactual)
    ("{} is located in the continent of", "Vinson Massif", "Antarctica", "Europe"),
    ("The capital of {} is", "France", "Paris", "Berlin"),
    ("The capital of {} is", "Japan", "Tokyo", "Madrid"),
    ("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
    ("{} is a product of", "iPhone", "Apple", "Microsoft"),
    ("{} plays the position of", "Lionel Messi", "forward", "goalkeeper"),
    ("The official language of {} is", "Brazil", "Portuguese", "Spanish"),
    ("{} was developed by", "Windows", "Microsoft", "Google"),
    ("The headquarters of {} are in", "Toyota", "Japan", "Germany"),
    ("{} is a citizen of", "Angela Merkel", "Germany", "France"),
    ("The capital of {} is", "Italy", "Rome", "Vienna"),
    ("{} was born in", "Wolfgang Amadeus Mozart", "Salzburg", "London"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = default_model_folder(Path("/tmp/kedit-smollm2-135m"))
    root = tmp_path_factory.mktemp("mend-smollm2")
    Repository.init(root / "work", str(folder), copy=False, progress=False)
    records = [{"prompt": t, "subject": s, "target_new": new, "ground_truth": true,
                "locality_prompt": FACTS[(i + 5) % len(FACTS)][0].format(FACTS[(i + 5) % len(FACTS)][1]),
                "locality_ground_truth": FACTS[(i + 5) % len(FACTS)][2]}
               for i, (t, s, true, new) in enumerate(FACTS)]
    (root / "train.json").write_text(json.dumps(records))
    return root


def test_train_then_edit(work: Path):
    repo = Repository.open(work / "work")
    info = train_editor(repo, TrainOptions(method="mend", data=[work / "train.json"], device="cpu", overrides={
        "max_steps": "12", "batch_size": "4", "val_every": "12", "val_size": "2", "rank": "64"}))
    assert list_editors(repo)[0].id == info.id and info.metrics["steps"] == 12
    assert info.hparams["layers"] == [27, 28, 29] and info.size < 20_000_000

    request = EditRequest(prompt="The capital of {} is", subject="Germany", target_new="Madrid",
                          target_true="Berlin")
    model, tok = load_revision(repo, "HEAD")
    before = metrics.target_nll(model, tok, [request.text], [request.target_new])[0]
    [commit] = run_edits(repo, [request], EditOptions(method="mend", measure=False))
    assert commit.hparams["editor"] == info.id and commit.info["edit_seconds"] < 5
    changes = repo.changes(commit.id)
    assert {c.name for c in changes} == {f"model.layers.{i}.mlp.down_proj.weight" for i in (27, 28, 29)}
    assert all(c.encoding == "lowrank" and c.stored_bytes < 200_000 for c in changes)
    edited, _ = load_revision(repo, "HEAD")
    after = metrics.target_nll(edited, tok, [request.text], [request.target_new])[0]
    assert after < before - 0.5
    # checked in generation on the prompt as sent: a 12-step editor moves the target; the commit says if it shows
    shown = commit.info["shows_in_generation"]
    assert shown is True or commit.info["not_shown_in_generation"] == [request.text]
