"""kedit export --format peft: the edits as a LoRA adapter that PEFT loads over the base, giving the
logits of kedit's own full export; what a LoRA cannot carry is refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kedit.cli import cli
from kedit.core.delta import Adapter, Dense, LowRank
from kedit.core.repo import Repository
from tests.conftest import build_tiny_model
from tests.jsondoc import doc
from tests.test_hub import REPO_ID, hub  # noqa: F401  (fixture: the local Hub)

LLAMA_DOWN = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
LLAMA_Q = "model.layers.0.self_attn.q_proj.weight"
GPT2_PROJ = ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


def low_rank(repo: Repository, name: str, rank: int, seed: int, scale: float = 0.05) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    rows, cols = repo.manifest()[name].shape
    return LowRank(torch.randn(rows, rank, generator=g) * scale, torch.randn(rank, cols, generator=g) * scale)


def run(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout if code == 0 else result.stderr


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def edit_history(repo: Repository, names: list[str]) -> None:
    """Three commits: two rank-one edits of the first tensor (ROME-like), one rank-3 edit of the second."""
    repo.commit({names[0]: low_rank(repo, names[0], 1, seed=1)}, method="rome", message="one")
    repo.commit({names[0]: low_rank(repo, names[0], 1, seed=2)}, method="rome", message="two")
    repo.commit({names[1]: low_rank(repo, names[1], 3, seed=3)}, method="memit", message="three")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_over_the_base_gives_the_full_exports_logits(tmp_path: Path, arch: str, tiny_llama_dir: Path,
                                                            tiny_gpt2_dir: Path) -> None:
    folder = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    names = LLAMA_DOWN if arch == "llama" else GPT2_PROJ
    repo = Repository.init(tmp_path / "work", str(folder), progress=False)
    edit_history(repo, names)
    result = doc(run(repo, "export", "HEAD", str(tmp_path / "lora"), "--format", "peft", "--json"))
    run(repo, "export", "HEAD", str(tmp_path / "full"))

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    modules = sorted(n.removesuffix(".weight") for n in names)
    assert sorted(config["target_modules"]) == modules  # named exactly, nothing else
    assert config["r"] == config["lora_alpha"] and config["use_rslora"] is False  # scale 1
    assert config["rank_pattern"] == config["alpha_pattern"] and len(config["rank_pattern"]) == 1
    assert config["base_model_name_or_path"] == str(folder.resolve())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert result["rank"] == 5 and result["exact"] and result["max_rel_error"] == 0.0
    assert {m: v["rank"] for m, v in result["modules"].items()} == {modules[0]: 2, modules[1]: 3}
    assert result["files"] == ["adapter_config.json", "adapter_model.safetensors", "kedit.json"]

    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not torch.allclose(logits(base), logits(full), atol=1e-3)  # the edits matter
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(full), rtol=1e-5, atol=1e-5)

    merged = peft_model.merge_and_unload().state_dict()
    exported = full.state_dict()
    eps = torch.finfo(torch.float32).eps
    for name in names:
        # kedit adds rank by rank and rounds after each step, PEFT adds one matmul: the two differ by
        # summation order only, within one float32 rounding at the tensor's scale
        assert float((merged[name] - exported[name]).abs().max()) <= eps * float(exported[name].abs().max()), name


def test_adapter_from_a_later_base_holds_only_the_later_edits(tmp_path: Path, tiny_llama_dir: Path) -> None:
    repo = Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)
    edit_history(repo, LLAMA_DOWN)
    result = doc(run(repo, "export", "HEAD", str(tmp_path / "lora"), "--format", "peft", "--base", "HEAD~1",
                     "--json"))
    assert list(result["modules"]) == [LLAMA_DOWN[1].removesuffix(".weight")] and result["rank"] == 3
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {} and config["base_model_name_or_path"].startswith("kedit:")
    run(repo, "export", "HEAD~1", str(tmp_path / "before"))
    run(repo, "export", "HEAD", str(tmp_path / "after"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "before").eval()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "after").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(after), rtol=1e-5, atol=1e-5)


def test_a_reverted_edit_is_left_out(tmp_path: Path, tiny_llama_dir: Path) -> None:
    repo = Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)
    edit_history(repo, LLAMA_DOWN)
    repo.revert("HEAD~2")  # the first rank-one edit of the first tensor
    result = doc(run(repo, "export", "HEAD", str(tmp_path / "lora"), "--format", "peft", "--json"))
    assert {m: v["rank"] for m, v in result["modules"].items()} == {
        LLAMA_DOWN[0].removesuffix(".weight"): 1, LLAMA_DOWN[1].removesuffix(".weight"): 3}
    run(repo, "export", "HEAD", str(tmp_path / "full"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "lora")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(logits(peft_model.eval()), logits(full.eval()), rtol=1e-5, atol=1e-5)
    # One rank-one step on a float32 tensor: the merged weight is kedit's, bit for bit.
    merged = peft_model.merge_and_unload().state_dict()[LLAMA_DOWN[0]]
    assert torch.equal(merged, full.state_dict()[LLAMA_DOWN[0]])


def test_dense_delta_is_refused_without_rank_and_truncated_with_it(tmp_path: Path, tiny_llama_dir: Path) -> None:
    repo = Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)
    name = LLAMA_DOWN[0]
    rows, cols = repo.manifest()[name].shape
    g = torch.Generator().manual_seed(0)
    dense = low_rank(repo, name, 2, seed=5).a @ low_rank(repo, name, 2, seed=5).b + 1e-4 * torch.randn(
        rows, cols, generator=g)
    repo.commit({name: Dense(dense)}, method="ft", message="ft-l")
    out = tmp_path / "lora"
    err = run(repo, "export", "HEAD", str(out), "--format", "peft", code=1)
    assert "dense delta" in err and "--rank" in err and len(err.strip().splitlines()) <= 2
    assert not out.exists() and not any(p.name.startswith(".lora") for p in tmp_path.iterdir())

    result = doc(run(repo, "export", "HEAD", str(out), "--format", "peft", "--rank", "2", "--json"))
    assert not result["exact"] and 0 < result["max_rel_error"] < 0.05  # the noise is what rank 2 leaves out
    run(repo, "export", "HEAD", str(tmp_path / "full"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    merged = peft_model.merge_and_unload().state_dict()[name]
    exported = full.state_dict()[name]
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()[name]
    rel = float((merged - exported).norm() / (exported - before).norm())
    assert rel == pytest.approx(result["max_rel_error"], rel=1e-3)


def test_grace_adapters_and_non_linear_tensors_are_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    repo = Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)
    out = tmp_path / "lora"
    err = run(repo, "export", "HEAD", str(out), "--format", "peft", code=1)
    assert "nothing to export" in err
    norm = "model.layers.0.input_layernorm.weight"
    repo.commit({norm: Dense(torch.full(repo.manifest()[norm].shape, 0.1))}, message="norm")
    err = run(repo, "export", "HEAD", str(out), "--format", "peft", "--rank", "1", code=1)
    assert norm in err and "Linear" in err
    repo.revert("HEAD")
    repo.commit({LLAMA_Q: low_rank(repo, LLAMA_Q, 1, seed=7)}, method="rome", message="q")
    repo.commit({}, adapters=[Adapter("grace", {"keys": torch.zeros(1, 32)}, {"module": "model.layers.2.mlp"})],
                method="grace", message="grace")
    err = run(repo, "export", "HEAD", str(out), "--format", "peft", code=1)
    assert "grace adapter" in err and "kedit export REV DIR" in err
    assert not out.exists()
    # Before the GRACE commit the q_proj edit alone exports; a folder that is not empty is left alone.
    out.mkdir()
    (out / "keep").write_text("mine")
    err = run(repo, "export", "HEAD~1", str(out), "--format", "peft", code=1)
    assert "not empty" in err and (out / "keep").read_text() == "mine"
    run(repo, "export", "HEAD~1", str(out), "--format", "peft", "--force")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [LLAMA_Q.removesuffix(".weight")]


def test_peft_options_need_the_peft_format(repo: Repository, tmp_path: Path) -> None:
    err = run(repo, "export", "HEAD", str(tmp_path / "out"), "--rank", "2", code=2)
    assert "--format peft" in err


def test_push_as_adapter_sends_the_adapter_and_a_card(tmp_path: Path, tiny_llama_dir: Path, hub) -> None:  # noqa: F811
    from huggingface_hub import snapshot_download

    repo = Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)
    edit_history(repo, LLAMA_DOWN)
    run(repo, "remote", "add", "lora", f"hf://{REPO_ID}")
    result = doc(run(repo, "push", "lora", "--as-adapter", "--to", "main", "--base-model", "alice/tiny-base",
                     "--json"))
    assert result["rank"] == 5 and result["exact"] and result["bytes"] < 20_000
    local = Path(snapshot_download(REPO_ID, revision="main", endpoint=hub.url, local_dir=tmp_path / "dl"))
    config = json.loads((local / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "alice/tiny-base"
    card = (local / "README.md").read_text()
    assert "base_model: alice/tiny-base" in card and "library_name: peft" in card
    assert all(c.short in card for c in repo.log()[:3]) and "memit" in card
    run(repo, "export", "HEAD", str(tmp_path / "full"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), local).eval()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    torch.testing.assert_close(logits(peft_model), logits(full), rtol=1e-5, atol=1e-5)
    # A branch that holds a kedit history is not given an adapter.
    run(repo, "push", "lora", "main", "--to", "history")
    err = run(repo, "push", "lora", "--as-adapter", "--to", "history", code=1)
    assert "holds a kedit history" in err
