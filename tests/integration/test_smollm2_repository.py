"""The repository engine on the real embedded model, SmolLM2-135M-Instruct (GGUF, 272 tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from kedit.cli import cli
from kedit.core.delta import LowRank
from kedit.core.maintenance import fsck
from kedit.core.repo import Repository
from kedit.core.tensors import hash_tensor

pytestmark = pytest.mark.slow

DOWN5 = "model.layers.5.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def smol_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    where = tmp_path_factory.mktemp("smol")
    result = CliRunner().invoke(cli, ["--repo", str(where), "init"], env={"KEDIT_DISABLE_PROGRESS_BARS": "1"})
    assert result.exit_code == 0, result.stderr
    assert "272 tensors" in result.stdout
    return Repository.open(where)


def test_init_stores_every_tensor_of_the_default_model(smol_repo: Repository) -> None:
    manifest = smol_repo.manifest()
    assert len(manifest) == 272
    assert manifest[DOWN5].shape == (576, 1536) and manifest[DOWN5].dtype == "F32"
    # 134,515,008 fp32 parameters: the tied lm_head is stored once
    assert sum(e.nbytes for e in manifest.values()) == 538_060_032
    assert "SmolLM2-135M-Instruct" in smol_repo.log()[0].message


def test_edit_revert_export_round_trip(smol_repo: Repository, tmp_path: Path) -> None:
    base = {n: e.hash for n, e in smol_repo.manifest().items()}
    gen = torch.Generator().manual_seed(0)
    edit = smol_repo.commit({DOWN5: LowRank(torch.randn(576, 1, generator=gen) * 0.01,
                                            torch.randn(1, 1536, generator=gen))}, message="rank one")
    (change,) = smol_repo.changes(edit.id)
    assert change.stored_bytes < 16_000  # against 3.5 MB for the dense matrix

    smol_repo.revert(edit.id)
    assert {n: e.hash for n, e in smol_repo.manifest().items()} == base

    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["--repo", str(smol_repo.root), "export", "HEAD", str(out)])
    assert result.exit_code == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert {n: hash_tensor(state[n]) for n in base} == base
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    text = tokenizer.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in text
    assert fsck(smol_repo).ok
