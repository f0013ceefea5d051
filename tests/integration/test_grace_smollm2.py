"""GRACE on the real SmolLM2-135M: an edit takes, unrelated facts stay, revert removes it, export loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedit.methods import grace
from kedit.methods.base import EditRequest
from transformers import AutoModelForCausalLM, AutoTokenizer

import kedit
from kedit.core.repo import Repository
from kedit.core.sources import default_model_folder
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.export import export
from kedit.model.load import load_revision

pytestmark = pytest.mark.slow

EDITS = [
    EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", target_true="Paris"),
    EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French"),
]
UNRELATED = [
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Germany is", "Berlin"),
    ("The Statue of Liberty is located in", "New York"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("The Colosseum is located in the city of", "Rome"),
]


def test_edit_locality_revert_export(tmp_path: Path) -> None:
    folder = default_model_folder(Path("/tmp/kedit-smollm2-135m"))  # converted once, reused
    repo = Repository.init(tmp_path / "work", str(folder), copy=False, progress=False)
    base, tok = load_revision(repo, "HEAD")
    reference = metrics.locality_reference(base, tok, UNRELATED)
    before = metrics.shows_in_generation(base, tok, [r.text for r in EDITS], [r.target_new for r in EDITS])
    assert before == [False, False]
    del base

    first, second = run_edits(repo, EDITS, EditOptions(method="grace"))
    for commit in (first, second):
        post = {m.name: m.value for m in commit.metrics if m.stage == "post"}
        assert post["gen_efficacy"] == 1.0 and post["reliability"] == 1.0

    model, tok = load_revision(repo, "HEAD")
    module = first.hparams["module_tmp"].format(first.hparams["layer"])
    assert len(grace.codebook_of(model, module)) == 2
    assert metrics.shows_in_generation(model, tok, [r.text for r in EDITS], ["Rome", "English"]) == [True, True]
    assert metrics.locality(model, tok, UNRELATED, reference).value == 1.0

    repo.revert(first.id)  # only the first edit's entry goes
    model, tok = load_revision(repo, "HEAD")
    assert [r.prompt for r in grace.records_of(model, module)] == [EDITS[1].text]
    assert metrics.shows_in_generation(model, tok, [r.text for r in EDITS], ["Rome", "English"]) == [False, True]

    out = tmp_path / "export"
    export(repo, "HEAD", out)
    with pytest.raises(ValueError, match=r"kedit\.load_model"):
        AutoModelForCausalLM.from_pretrained(out)
    loaded = kedit.load_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert metrics.shows_in_generation(loaded, tok, [EDITS[1].text], ["English"]) == [True]
    assert metrics.locality(loaded, tok, UNRELATED, reference).value == 1.0
