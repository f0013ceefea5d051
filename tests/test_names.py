"""Names from outside (kedit/core/names.py, refs.check_ref_name) and the one safe writer, tried through
the CLI as a user or an attacker would: a model file with a tensor named `../x`, a ref name that
shadows a commit, a history whose rows name a file outside the folder being written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from kedit.cli import cli
from kedit.core.errors import BadNameError
from kedit.core.names import check_file_path, check_tensor_name, inside
from kedit.core.repo import Repository
from kedit.core.store import atomic_write_bytes
from tests.helpers_engine import snapshot


def run(where: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(where), *args])
    out = result.stdout + result.stderr
    assert result.exit_code == code, out
    assert "Traceback" not in out
    return result.stdout if code == 0 else result.stderr


def one_line_error(err: str) -> None:
    assert err.startswith("kedit: error:") and err.count("\n") == 1, err


# -- kedit init: tensor names in the model file --------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/b.weight", "model..weight", ".hidden", "x\x00y", "x\\y",
                                 "tab\there", "x" * 600])
def test_init_refuses_a_tensor_name_that_is_not_a_state_dict_key(tmp_path: Path, bad: str) -> None:
    weights = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(2, 2), bad: torch.ones(2)}, str(weights))
    err = run(tmp_path / "work", "init", str(weights), code=1)
    one_line_error(err)
    assert "unsafe tensor name" in err
    assert not (tmp_path / "work" / ".kedit").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"model.safetensors", "work"}


def test_init_refuses_a_tensor_in_two_weight_files_and_an_index_that_climbs_out(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for shard in ("a.safetensors", "b.safetensors"):
        save_file({"model.norm.weight": torch.ones(2)}, str(folder / shard))
    err = run(tmp_path / "work", "init", str(folder), code=1)
    one_line_error(err)
    assert "also in another weight file" in err
    save_file({"model.norm.weight": torch.ones(2)}, str(tmp_path / "evil.safetensors"))
    index = {"weight_map": {"model.norm.weight": "../evil.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    err = run(tmp_path / "work", "init", str(folder), code=1)
    one_line_error(err)
    assert "unsafe shard name" in err and not (tmp_path / "work" / ".kedit").exists()


# -- ref names -----------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "name"), [
    ("branch", "refs/heads/x"), ("branch", "refs/tags/v1"), ("branch", "60BC4E6E"), ("branch", "60bc4e6e"),
    ("branch", "DeadBeef"), ("tag", "deadbeef"), ("tag", "ABCDEF0123456789ABCDEF0123456789"), ("branch", "HEAD"),
    ("branch", "a..b"), ("branch", "_x/../y"), ("branch", "x" * 300), ("tag", "x y"), ("branch", "x.lock"),
])
def test_ref_names_that_no_command_could_name_or_that_shadow_a_commit_are_refused(
        repo: Repository, command: str, name: str) -> None:
    before = snapshot(repo)
    err = run(repo.root, command, name, code=1)
    one_line_error(err)
    assert f"invalid {command if command == 'tag' else 'branch'} name" in err
    assert snapshot(repo) == before


def test_valid_ref_names_still_work_and_a_commit_id_still_resolves(repo: Repository) -> None:
    head = repo.head()
    for name in ("feature/x-1", "v1.0", "release_2", "abc", "cafe-1", "deadbeef0123456789abcdef012345678"):
        run(repo.root, "branch", name)
    run(repo.root, "tag", "v1.0.0")
    assert repo.refs.branches().keys() >= {"feature/x-1", "v1.0", "release_2", "abc", "cafe-1"}
    assert repo.resolve(head[:8].upper()) == head


# -- the one safe writer -------------------------------------------------------------------

def test_export_and_checkout_refuse_a_history_row_naming_a_file_outside(repo: Repository, tmp_path: Path) -> None:
    """A repository filled by an older kedit (or edited by hand): its rows are checked where
    they become file names, so the file never lands outside."""
    target = tmp_path / "outside" / "PWNED"
    target.parent.mkdir()
    climb = "../" * 24 + str(target).lstrip("/")
    with repo.db.conn:
        repo.db.execute("UPDATE files SET path = ? WHERE path = 'config.json'", [climb])
    err = run(repo.root, "export", "HEAD", str(tmp_path / "out"), code=1)
    one_line_error(err)
    assert "unsafe file name" in err and not (tmp_path / "out").exists()
    err = run(repo.root, "checkout", "--force", "HEAD", code=1)
    one_line_error(err)
    assert not target.exists() and not list(tmp_path.rglob("PWNED*"))


def test_the_writer_refuses_a_destination_outside_its_root_even_through_a_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    for dest in ("../x", str(outside / "x"), "link/x", "a/../../x"):
        with pytest.raises(BadNameError, match="outside"):
            atomic_write_bytes(Path(dest), b"PWNED", root=root)
    atomic_write_bytes(Path("sub/ok.json"), b"{}", root=root)
    assert (root / "sub" / "ok.json").read_bytes() == b"{}"
    assert list(outside.iterdir()) == [] and inside(root, "sub/ok.json") == (root / "sub" / "ok.json").resolve()


@pytest.mark.parametrize("good", ["model.layers.5.mlp.down_proj.weight", "lm_head.weight", "transformer.h.0.c_fc.b",
                                  "blk-1.ffn_down.weight"])
def test_real_tensor_names_pass(good: str) -> None:
    assert check_tensor_name(good) == good


@pytest.mark.parametrize("bad", ["../x", "/abs", "C:/x", "a\\b", "a//b", ".kedit/refs.json", "x\n", "./x",
                                 "model.safetensors", "kedit.json", "kedit_adapters/0000-grace.safetensors"])
def test_file_paths_that_kedit_would_not_write(bad: str) -> None:
    with pytest.raises(BadNameError):
        check_file_path(bad)
    assert check_file_path("tokenizer/vocab.json") == "tokenizer/vocab.json"
