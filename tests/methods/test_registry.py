"""The method registry: declared capabilities, entry points read without imports, the CLI's choices.

A third party's method (tests/methods/plugin: a dist-info folder with its entry point, and the
method's module) is installed for a test by putting its folder on `sys.path`, which is all that
importlib.metadata needs to find a distribution.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from kedit.methods import registry
from kedit.methods.base import EditResult, get_method, method_names, register_method

from kedit.cli import cli
from kedit.core.plugins import CAPABILITIES, declared_methods
from kedit.core.repo import Repository
from tests.jsondoc import doc
from tests.tiny import make_model, make_tokenizer

PLUGIN = Path(__file__).resolve().parent / "plugin"
BUILT_IN = {"rome": {"stats"}, "memit": {"batch", "stats"}, "alphaedit": {"batch", "stats", "memory"},
            "ft": {"batch"}, "grace": {"adapters"}, "mend": {"editor"}, "instructedit": {"editor"}}


@pytest.fixture
def plugin_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN))


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry of the test's own, empty as in a process that has imported no method yet."""
    monkeypatch.setattr(registry, "_REGISTRY", {})


@dataclasses.dataclass
class Knobs:
    mom2_n_samples: int = 8

    @classmethod
    def for_model(cls, model: object) -> Knobs:
        return cls()


def nothing(model, tok, requests, hparams, **_given) -> EditResult:
    return EditResult()


def test_the_built_in_methods_are_declared_by_kedit_s_own_entry_points() -> None:
    declared = declared_methods()
    assert {n: set(declared[n].capabilities) for n in BUILT_IN} == BUILT_IN
    assert {declared[n].distribution for n in BUILT_IN} == {"kedit"}
    for name, caps in BUILT_IN.items():
        assert all(get_method(name).has(c) == (c in caps) for c in CAPABILITIES)


def test_names_and_capabilities_are_read_without_importing_a_method_or_torch() -> None:
    """`kedit edit --help` and train-editor's choices: metadata only (kedit/core/plugins.py)."""
    code = ("import sys\nfrom kedit.cli import cli\n"
            "for args in (['edit', '--help'], ['train-editor', '--help']):\n"
            "    cli(args, standalone_mode=False)\n"
            "print('LOADED', sorted(m for m in sys.modules if m.startswith(('kedit.methods.', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[alphaedit|ft|grace|instructedit|memit|mend|rome]" in out and "[instructedit|mend]" in out
    assert out.splitlines()[-1] == "LOADED ['kedit.methods.registry']"


def test_a_third_party_method_is_offered_and_runs_through_the_engine(plugin_installed, tmp_path: Path) -> None:
    assert "tiny-logit" in method_names() and "tiny-logit" in method_names("batch")
    assert "tiny-logit" not in method_names("editor")
    runner = CliRunner()
    assert "grace|instructedit|memit|mend|rome|tiny-logit]" in runner.invoke(cli, ["edit", "--help"]).output
    assert "tiny-logit" not in runner.invoke(cli, ["train-editor", "--help"]).output

    folder = tmp_path / "model"
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    repo = Repository.init(tmp_path / "work", str(folder), progress=False)
    edit = ["--repo", str(repo.root), "edit", "--method", "tiny-logit", "--no-eval", "--json"]
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "{} is in", "subject": s, "target_new": t}
                                    for s, t in (("Madrid", "Japan"), ("Tokyo", "Spain"))]))
    result = runner.invoke(cli, [*edit, "--requests", str(requests)])
    assert result.exit_code == 0, result.output
    [commit] = doc(result.stdout)["commits"]  # declared "batch": both requests in one commit
    assert commit["info"]["layer"] == 2 and repo.log()[0].method == "tiny-logit"
    assert [c.name for c in repo.changes("HEAD")] == ["model.layers.2.mlp.down_proj.weight"]


def test_train_editor_refuses_a_method_without_an_editor(tmp_path: Path) -> None:
    data = tmp_path / "train.json"
    data.write_text("[]")
    result = CliRunner().invoke(cli, ["train-editor", "--method", "rome", "--data", str(data)])
    assert result.exit_code == 2
    assert "'--method': method 'rome' does not declare 'editor'; methods that do: instructedit, mend" in result.stderr


def test_register_method_in_process_declares_its_capabilities(scratch_registry) -> None:
    method = register_method("scratch", Knobs, nothing, capabilities=["batch", "stats"])
    assert get_method("scratch") is method and method.has("stats") and not method.has("memory")
    assert "scratch" in method_names("stats") and "scratch" not in method_names("memory")
    with pytest.raises(ValueError, match="already registered"):
        register_method("scratch", Knobs, nothing)


@pytest.mark.parametrize(("name", "capabilities", "extra", "message"), [
    ("Bad", [], {}, "lower-case"),
    ("typo", ["stat"], {}, r"unknown capabilities \['stat'\]"),
    ("no-train", ["editor"], {}, "go together"),
    ("train-undeclared", [], {"train": nothing, "train_hparams_cls": Knobs}, "go together"),
    ("no-editor-field", ["editor"], {"train": nothing, "train_hparams_cls": Knobs}, "need a field 'editor'"),
    ("rome", ["batch"], {}, r"entry point of kedit declares \['stats'\]"),
])
def test_a_registration_that_breaks_its_declaration_is_refused(scratch_registry, name, capabilities, extra,
                                                                message) -> None:
    with pytest.raises(ValueError, match=message):
        register_method(name, Knobs, nothing, capabilities=capabilities, **extra)


def test_an_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown method 'nope'; known methods: alphaedit, ft, grace"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown capability"):
        method_names("batches")
