"""Edit-request files in the peers' formats become the same EditRequest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.edit.requests import RequestFormatError, load_requests

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

COUNTERFACT = {
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "subject": "Danielle Darrieux", "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"], "attribute_prompts": [], "generation_prompts": [],
}
EASYEDIT = {"prompt": "Who was the designer of Lahti Town Hall?", "subject": "Lahti Town Hall",
            "target_new": "Alfred Lahti", "ground_truth": "Eliel Saarinen",
            "rephrase_prompt": "What architect designed Lahti Town Hall?",
            "locality_prompt": "nq question: where does the last name hansen come from",
            "locality_ground_truth": "Norway"}
KNOWEDIT = {"subject": "Ray Charles", "prompt": "The name of the country of citizenship of Ray Charles is",
            "target_new": "Ireland", "ground_truth": "United States of America",
            "portability": {"Reasoning": [{"prompt": "The capital of Ray Charles's country is",
                                           "ground_truth": [["Dublin"]]}]},
            "locality": {"Relation_Specificity": [{"prompt": "The occupation of Ray Charles is",
                                                   "ground_truth": ["singer", "pianist"]}]}}


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in data) + "\n")  # type: ignore[union-attr]
    else:
        path.write_text(json.dumps(data))
    return path


def test_counterfact_record(tmp_path: Path) -> None:
    (r,) = load_requests([write(tmp_path, "cf.json", [COUNTERFACT])])
    assert (r.template, r.subject, r.target_new, r.target_true) == (
        "The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert r.neighbourhood == ("The mother tongue of Léon Blum is",) and len(r.paraphrases) == 1


def test_easyedit_and_knowedit_records_in_one_jsonl(tmp_path: Path) -> None:
    easy, know = load_requests([write(tmp_path, "mixed.jsonl", [EASYEDIT, KNOWEDIT])])
    assert easy.template == "Who was the designer of {}?" and easy.target_true == "Eliel Saarinen"
    assert easy.paraphrases == ("What architect designed Lahti Town Hall?",)
    assert easy.locality == (("nq question: where does the last name hansen come from", "Norway"),)
    assert know.portability == (("The capital of Ray Charles's country is", "Dublin"),)
    assert know.locality == (("The occupation of Ray Charles is", "singer"),)


@pytest.mark.skipif(not (SHARED / "zsre_sample.json").exists(), reason="shared data not present")
def test_real_zsre_sample_in_mend_format() -> None:
    requests = load_requests([SHARED / "zsre_sample.json"])
    assert len(requests) == 34
    first = requests[0]
    assert first.subject == "Watts Humphrey" and first.target_new == "University of Michigan"
    assert first.paraphrases == ("What university did Watts Humphrey take part in?",)
    assert first.locality[0][1] == "Hugo Weaving"
    assert all(r.subject in r.text for r in requests)


def test_bad_records_name_the_file_and_record(tmp_path: Path) -> None:
    with pytest.raises(RequestFormatError, match=r"bad.json: record 1: the subject 'Paris' is not in the prompt"):
        load_requests([write(tmp_path, "bad.json", [EASYEDIT, {"prompt": "x is", "subject": "Paris",
                                                              "target_new": "y"}])])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RequestFormatError, match="not valid JSON"):
        load_requests([tmp_path / "broken.json"])
    with pytest.raises(RequestFormatError, match="unrecognised record"):
        load_requests([write(tmp_path, "other.json", [{"question": "?"}])])
    with pytest.raises(RequestFormatError, match="the target is empty"):
        load_requests([write(tmp_path, "empty.json", [{**EASYEDIT, "target_new": " "}])])
