"""GRACE through the command line: commits carry the codebook records; show, diff, revert, checkout, export."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from kedit.methods import grace
from kedit.methods.base import EditRequest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import kedit
from kedit.cli import cli
from kedit.core.repo import Repository
from kedit.edit.run import EditOptions, run_edits
from kedit.eval import metrics
from kedit.model.load import load_revision
from tests.jsondoc import doc
from tests.tiny import make_tokenizer

MODULE = "model.layers.2.mlp.down_proj"  # the tiny Llama's default codebook module (3 layers)
# A radius of 50 covers both prompts of the tiny model, so the second edit splits the first's radius.
FRANCE = ["edit", "--method", "grace", "--prompt", "The capital city is France", "--subject", "France",
          "--target", "Japan", "--set", "eps_init=50"]
BERLIN = ["edit", "--method", "grace", "--prompt", "Berlin is the capital of", "--subject", "Berlin",
          "--target", "Paris", "--set", "eps_init=50"]
PROMPTS, TARGETS = ["The capital city is France", "Berlin is the capital of"], ["Japan", "Paris"]


@pytest.fixture
def repo(tmp_path: Path, tiny_folder: Path) -> Repository:
    return Repository.init(tmp_path / "work", str(tiny_folder), progress=False)


def run(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout + result.stderr


def scores(model, tok) -> list[float]:
    """1.0 where two greedy tokens after tokenizer(prompt) hold the target (one token on the tiny vocabulary)."""
    return [float(s) for s in metrics.shows_in_generation(model, tok, PROMPTS, TARGETS, 2)]


def radii(model) -> list[float]:
    book = grace.codebook_of(model, MODULE)
    return [] if book is None else book.radii[: len(book)].tolist()


def test_grace_commits_show_diff_revert_checkout(repo: Repository) -> None:
    base = repo.head()
    out = run(repo, *FRANCE)
    assert "gen_efficacy 0.00->1.00" in out
    out = run(repo, *BERLIN)
    assert "gen_efficacy 0.00->1.00" in out
    assert not repo.changes("HEAD") and repo.log()[0].method == "grace"  # no weight changed
    assert len(repo.adapters("HEAD")) == 2

    shown = run(repo, "show", "HEAD")
    assert "Adapter add: grace" in shown and "'Berlin is the capital of' -> 'Paris'" in shown
    assert "action=split" in shown and "nearest=The capital city is France" in shown
    (entry,) = doc(run(repo, "show", "HEAD", "--json"))["adapters"][0]["config"]["entries"]
    assert entry["action"] == "split" and entry["radius"] < 50
    diff = doc(run(repo, "diff", base, "HEAD", "--json", code=1))  # 1: they differ, as git diff --exit-code
    assert len(diff["adapters"]["added"]) == 2 and not diff["tensors"]

    model, tok = load_revision(repo, "HEAD")
    assert scores(model, tok) == [1.0, 1.0] and all(r < 50 for r in radii(model))

    # Reverting the first edit removes exactly its entry; the second's radius is whole again.
    run(repo, "revert", "HEAD~1")
    assert "Adapter remove: grace" in run(repo, "show", "HEAD") and "The capital city is France" in run(
        repo, "show", "HEAD")
    model, tok = load_revision(repo, "HEAD")
    assert radii(model) == [50.0] and scores(model, tok)[1] == 1.0
    assert grace.codebook_of(model, MODULE).labels == [tuple(metrics.answer_ids(tok, "Paris"))]

    # Every revision loads with its own codebook; the base with none.
    first = repo.log()[2].id
    model, tok = load_revision(repo, first)
    assert radii(model) == [50.0] and scores(model, tok)[0] == 1.0
    run(repo, "checkout", base)
    model, tok = load_revision(repo, "HEAD")
    assert grace.codebook_of(model, MODULE) is None and scores(model, tok) == [0.0, 0.0]


def test_export_loads_with_kedit_and_plain_transformers_refuses(repo: Repository, tmp_path: Path) -> None:
    run(repo, "export", "HEAD", str(tmp_path / "plain"))  # no adapters: an ordinary folder
    AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    run(repo, *FRANCE)
    out = run(repo, "export", "HEAD", str(tmp_path / "out"))
    assert "kedit.load_model" in out
    assert (tmp_path / "out" / "kedit_adapters" / "0000-grace.safetensors").is_file()
    with pytest.raises(ValueError, match=r"kedit.load_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    model = kedit.load_model(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert metrics.shows_in_generation(model, tok, PROMPTS[:1], TARGETS[:1], 2) == [True]
    original, _ = load_revision(repo, "HEAD~1")
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the weights are the base's: the edit lives in the codebook


def plain_tokenizer_and_what_transformers_said(folder: Path) -> tuple[object, list[str]]:
    """AutoTokenizer.from_pretrained(folder) with transformers' warnings on, and every warning it gave
    (its logger does not propagate to the root, so the handler goes on it)."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    verbosity, logger = hf_logging.get_verbosity(), logging.getLogger("transformers")
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = AutoTokenizer.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    return tok, said + [str(w.message) for w in caught]


def test_the_exported_tokenizer_loads_with_plain_transformers_in_silence(repo: Repository, tmp_path: Path) -> None:
    """The marked config.json makes every model class refuse the folder, but AutoTokenizer, which reads
    it too, gives no warning about the marked model type (nor any other)."""
    run(repo, *FRANCE)
    out = tmp_path / "out"
    run(repo, "export", "HEAD", str(out))
    tok, said = plain_tokenizer_and_what_transformers_said(out)
    assert said == []
    assert tok(PROMPTS[0])["input_ids"] == make_tokenizer()(PROMPTS[0])["input_ids"]
    for auto in (AutoConfig, AutoModelForCausalLM):
        with pytest.raises(ValueError, match=r"kedit.load_model"):
            auto.from_pretrained(out)
    assert metrics.shows_in_generation(kedit.load_model(out), tok, PROMPTS[:1], TARGETS[:1], 2) == [True]

    # A folder marked as kedit 0.1 marked it (no generic sub-config): the warning this removes, and it still loads.
    config = json.loads((out / "config.json").read_text())
    del config["kedit_generic"]
    (out / "config.json").write_text(json.dumps(config))
    _, said = plain_tokenizer_and_what_transformers_said(out)
    assert any("kedit-adapters" in s for s in said)
    assert metrics.shows_in_generation(kedit.load_model(out), tok, PROMPTS[:1], TARGETS[:1], 2) == [True]


def test_eval_of_a_grace_history_scores_by_generation_too(repo: Repository) -> None:
    run(repo, *FRANCE)
    run(repo, *BERLIN)
    scores_ = {m["name"]: m["value"] for m in doc(run(repo, "eval", "HEAD", "--json"))["metrics"]}
    assert scores_["gen_efficacy"] == 1.0 and scores_["reliability"] == 1.0
    stored = {m.name for m in repo.get_commit(repo.head()).metrics if m.stage == "eval"}
    assert {"reliability", "gen_efficacy"} <= stored


def test_bad_grace_hyper_parameters_are_one_line_errors(repo: Repository) -> None:
    head = repo.head()
    out = run(repo, *BERLIN[:-2], "--set", "eps_init=-1", code=1)
    assert "kedit: error:" in out and "eps_init" in out
    out = run(repo, *BERLIN[:-2], "--set", "radius=3", code=1)
    assert "unknown" in out and "eps_init" in out
    assert repo.head() == head


def test_rome_under_a_grace_codebook_records_the_dtype_its_upper_layers_ran_in(tmp_path: Path,
                                                                              tiny_folder: Path) -> None:
    """A codebook's hook above ROME's layer keeps the layers there as loaded (a bfloat16 copy would
    freeze its state): the commit records float32, not the requested bfloat16, and re-running it
    with the recorded hyper-parameters gives the same delta, bit for bit."""
    repo = kedit.Repository.init(tmp_path / "work", str(tiny_folder), progress=False)
    repo.edit({"prompt": PROMPTS[0], "subject": "France", "target_new": "Japan"}, method="grace",
              overrides={"eps_init": 50}, measure=False)
    parent = repo.head()
    request = EditRequest(prompt=PROMPTS[1], subject="Berlin", target_new="Paris")
    overrides = {"mom2_adjustment": "false", "v_weight_decay": "0", "clamp_norm_factor": "50",
                 "v_num_grad_steps": "12", "early_stop_loss": "0", "context_template_length_params": "[[3,2]]"}
    (commit,) = repo.edit(request, overrides=overrides, measure=False)
    assert commit.hparams["layer"] < int(MODULE.split(".")[2])  # the codebook is above the edit
    assert commit.hparams["v_dtype"] == "float32" and commit.info["v_dtype_used"] == ["float32"]
    repo.reset(parent)
    (again,) = run_edits(repo, [request], EditOptions(recorded_hparams=commit.hparams, measure=False))
    assert again.hparams == commit.hparams
    name = f"model.layers.{commit.hparams['layer']}.mlp.down_proj.weight"
    edited, replayed = repo.materialize(commit.id, names=[name]), repo.materialize(again.id, names=[name])
    assert not torch.equal(edited[name], repo.materialize(parent, names=[name])[name])
    assert torch.equal(replayed[name], edited[name])
