"""kedit train-editor / editors / edit --method mend|instructedit on a tiny model with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kedit.cli import cli
from kedit.core import db as dbm
from kedit.core.repo import Repository
from tests.jsondoc import doc

FACTS = [  # (prompt, subject, new target, true target) in the tiny tokenizer's words
    ("The capital city is {}", "France", "Japan", "Paris"),
    ("The language of {} is", "Japan", "French", "Japanese"),
    ("{} is the capital of", "Berlin", "Spain", "Germany"),
    ("{} is in", "Madrid", "Japan", "Spain"),
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("{} makes the", "Apple", "guitar", "iPhone"),
    ("{} plays the", "Toko Yasuda", "iPhone", "guitar"),
    ("Her mother tongue is {}", "French", "Japanese", "French"),
    ("The capital of {} is", "Italy", "Tokyo", "Rome"),
    ("{} is in", "Tokyo", "Spain", "Japan"),
]
TRAIN = ["--set", "rank=4", "--set", "batch_size=2", "--set", "val_every=2", "--set", "val_size=2"]


def records(task: str | None = None) -> list[dict]:
    out = []
    for t, s, new, true in FACTS:
        r = {"prompt": t, "subject": s, "target_new": new, "ground_truth": true,
             "rephrase_prompt": t.replace("{}", s) + " the"}
        if task:
            r["task"] = task
        out.append(r)
    return out


@pytest.fixture
def work(tmp_path: Path, tiny_folder: Path) -> Path:
    Repository.init(tmp_path / "work", str(tiny_folder), progress=False)
    (tmp_path / "train.json").write_text(json.dumps(records()))
    return tmp_path


def _run(work: Path, *args: str):
    result = CliRunner().invoke(cli, ["--repo", str(work / "work"), *args], catch_exceptions=False)
    return result


def test_train_list_edit_and_resume(work: Path):
    r = _run(work, "train-editor", "--method", "mend", "--data", str(work / "train.json"), *TRAIN,
             "--set", "max_steps=2", "--json")
    assert r.exit_code == 0, r.output
    first = doc(r.stdout)["editor"]
    assert first["method"] == "mend" and first["metrics"]["steps"] == 2 and first["metrics"]["n_val"] == 2
    assert set(first["metrics"]) >= {"val_reliability", "val_generalization", "val_locality", "train_seconds"}
    assert first["hparams"]["layers"] == [0, 1, 2] and len(first["data_hash"]) == 32
    repo = Repository.open(work / "work")
    tensors, meta = repo.store.get_tensors(first["id"])  # content-addressed: the id is the object's
    assert meta["kind"] == "editor" and meta["method"] == "mend" and "step" in tensors

    # a larger budget continues the same run from its checkpoint (steps 3-4 only)
    checkpoints = list((work / "work" / ".kedit" / "training").glob("*/checkpoint.safetensors"))
    assert len(checkpoints) == 1
    r = _run(work, "train-editor", "--method", "mend", "--data", str(work / "train.json"), *TRAIN,
             "--set", "max_steps=4", "--json")
    assert r.exit_code == 0, r.output
    second = doc(r.stdout)["editor"]
    assert second["metrics"]["steps"] == 4 and [h["step"] for h in second["metrics"]["history"]] == [2, 4]
    assert second["id"] != first["id"]

    r = _run(work, "editors", "--json")
    listed = doc(r.stdout)["editors"]
    assert [e["id"] for e in listed] == [second["id"], first["id"]]  # newest first

    # edit with the latest editor: the commit names it and holds low-rank factors
    r = _run(work, "edit", "--method", "mend", "--prompt", "The capital city is France", "--subject", "France",
             "--target", "Japan", "--no-eval", "--json")
    assert r.exit_code == 0, r.output
    commit = repo.get_commit(doc(r.stdout)["commits"][0]["id"])
    assert commit.hparams["editor"] == second["id"] and commit.info["editor"] == second["id"]
    names = {ch.name for ch in repo.changes(commit.id)}
    assert names == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
    assert all(ch.encoding == "lowrank" for ch in repo.changes(commit.id))
    listed = doc(_run(work, "editors", "--json").stdout)["editors"]
    assert listed[0]["used_by"] == [commit.id]
    human = _run(work, "editors").stdout.splitlines()
    assert human[0].startswith(second["id"][:12]) and "mend" in human[0] and "used-by=1" in human[0]

    # an older editor by prefix
    r = _run(work, "edit", "--method", "mend", "--editor", first["id"][:8], "--prompt", "{} is in",
             "--subject", "Madrid", "--target", "Japan", "--no-eval", "--json")
    assert r.exit_code == 0, r.output
    assert repo.get_commit(doc(r.stdout)["commits"][0]["id"]).hparams["editor"] == first["id"]

    # editors are kept by gc and checked by fsck like every object
    assert _run(work, "gc", "--prune", "now").exit_code == 0
    assert repo.store.has(first["id"]) and repo.store.has(second["id"])
    assert _run(work, "fsck").exit_code == 0


def test_instructedit_trains_on_tasks_and_edits_with_an_instruction(work: Path):
    (work / "mixed.json").write_text(json.dumps(records("counterfact")[:5] + records("sentiment")[5:]))
    r = _run(work, "train-editor", "--method", "instructedit", "--data", str(work / "mixed.json"), *TRAIN,
             "--set", "max_steps=2", "--json")
    assert r.exit_code == 0, r.output
    info = doc(r.stdout)["editor"]
    assert info["metrics"]["tasks"] == ["counterfact", "sentiment"]
    r = _run(work, "edit", "--method", "instructedit", "--set", "task=zsre", "--prompt", "{} is in",
             "--subject", "Madrid", "--target", "Japan", "--no-eval", "--json")
    assert r.exit_code == 0, r.output
    out = doc(r.stdout)["commits"][0]
    assert out["info"]["editor"] == info["id"] and out["info"]["task"] == "zsre"
    assert out["info"]["instruction"]  # the held-out description of the task


def test_errors_are_one_line_and_change_nothing(work: Path):
    repo = Repository.open(work / "work")
    head = repo.head()
    r = _run(work, "edit", "--method", "mend", "--prompt", "{} is in", "--subject", "Madrid", "--target", "Japan")
    assert r.exit_code == 1 and "no trained mend editor" in r.stderr and "train-editor" in r.stderr
    r = _run(work, "train-editor", "--method", "mend", "--data", str(work / "train.json"), "--set", "rank=0")
    assert r.exit_code == 1 and "rank must be >= 1" in r.stderr
    (work / "bad.json").write_text(json.dumps([{"prompt": "x"}]))
    r = _run(work, "train-editor", "--data", str(work / "bad.json"))
    assert r.exit_code == 1 and "record 0" in r.stderr
    r = _run(work, "edit", "--method", "mend", "--editor", "zzzz", "--prompt", "{} is in", "--subject", "Madrid",
             "--target", "Japan")
    assert r.exit_code == 1 and "no editor 'zzzz'" in r.stderr
    assert repo.head() == head and _run(work, "editors").stdout == ""


def test_an_editor_trained_under_the_old_prompt_protocol_is_not_used(work: Path):
    """An editor from an older kedit (trained on prompts after a private start token) is neither
    picked as the latest nor accepted by id: its keys are not those of the prompts users send."""
    r = _run(work, "train-editor", "--method", "mend", "--data", str(work / "train.json"), *TRAIN,
             "--set", "max_steps=2", "--json")
    assert r.exit_code == 0, r.output
    editor = doc(r.stdout)["editor"]
    assert editor["metrics"]["prompt_protocol"] == "user_prompt"
    repo = Repository.open(work / "work")
    with dbm.write(repo.db):  # what an older kedit recorded: no protocol
        repo.db.execute("UPDATE editors SET metrics = json_remove(metrics, '$.prompt_protocol')")
    head = repo.head()
    edit = ["edit", "--method", "mend", "--prompt", "{} is in", "--subject", "Madrid", "--target", "Japan"]
    r = _run(work, *edit)
    assert r.exit_code == 1 and "1 trained under an older prompt protocol" in r.stderr and "train-editor" in r.stderr
    r = _run(work, *edit, "--editor", editor["id"][:8])
    assert r.exit_code == 1 and "older prompt protocol" in r.stderr and "Traceback" not in r.stderr
    assert repo.head() == head


ZSRE_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre_sample.json"


def test_training_loaders_read_every_format_with_its_task(tmp_path: Path):
    from kedit.edit.requests import load_training_requests

    records = [
        {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                             "target_new": {"str": "English"}, "target_true": {"str": "French"}},
         "paraphrase_prompts": ["Danielle Darrieux spoke"], "neighborhood_prompts": ["Léon Blum's mother tongue is"]},
        {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "alt": "Michigan",
         "answers": ["Illinois"], "rephrase": "Which university did Watts Humphrey go to?",
         "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"},
        {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
         "rephrase_prompt": "France's capital is", "locality_prompt": "The capital of Japan is",
         "locality_ground_truth": "Tokyo"},  # EasyEdit flat
        {"subject": "Dublin", "prompt": "Dublin is the capital of", "target_new": "Wales", "ground_truth": "Ireland",
         "portability": {"Reasoning": [{"prompt": "The river of Dublin's country", "ground_truth": [["Liffey"]]}]},
         "locality": {"Relation_Specificity": [{"prompt": "Dublin's mayor is", "ground_truth": ["X"]}]},
         "type": "recent"},  # KnowEdit, with InstructEdit's task field
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    got = load_training_requests([path])
    assert [t for _, t in got] == ["counterfact", "zsre", "facts", "recent"]
    cf, zs, flat, know = (r for r, _ in got)
    assert cf.paraphrases == ("Danielle Darrieux spoke",) and cf.neighbourhood and cf.target_true == "French"
    assert zs.paraphrases and zs.locality == (("nq question: who wrote hamlet", "Shakespeare"),)
    assert flat.locality == (("The capital of Japan is", "Tokyo"),)
    assert know.locality == (("Dublin's mayor is", "X"),) and know.portability[0][1] == "Liffey"
    if ZSRE_SAMPLE.exists():  # the real zsRE (MEND) file format
        real = load_training_requests([ZSRE_SAMPLE])
        assert len(real) == 34 and {t for _, t in real} == {"zsre"}
        assert all(r.paraphrases and r.locality for r, _ in real)
