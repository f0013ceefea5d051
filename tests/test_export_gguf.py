"""kedit export --format gguf: tiny Llama and Qwen2 revisions written as GGUF files that transformers'
GGUF loader reads back with the same tensor values (f32) or within one quantisation step (q8_0);
a base made from a GGUF file keeps its metadata and per-tensor types; adapters are refused."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from kedit.cli import cli
from kedit.core.delta import Adapter, LowRank
from kedit.core.repo import Repository
from tests.jsondoc import doc
from tests.tiny import make_model, make_tokenizer

DOWN = "model.layers.1.mlp.down_proj.weight"
PROMPT = "The capital city is France"


def run(repo: Repository, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout if code == 0 else result.stderr


def edited_repo(tmp_path: Path, arch: str) -> Repository:
    folder = tmp_path / f"tiny-{arch}"
    tok = make_tokenizer()
    make_model(arch, len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    repo = Repository.init(tmp_path / "work", str(folder), progress=False)
    g = torch.Generator().manual_seed(1)
    rows, cols = repo.manifest()[DOWN].shape
    repo.commit({DOWN: LowRank(torch.randn(rows, 1, generator=g) * 0.1, torch.randn(1, cols, generator=g) * 0.1)},
                method="rome", message="edit")
    return repo


def types_of(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_loads_back_with_transformers(tmp_path: Path, arch: str) -> None:
    repo = edited_repo(tmp_path, arch)
    values = repo.materialize("HEAD")
    f32 = doc(run(repo, "export", "HEAD", str(tmp_path / "out" / "f32.gguf"), "--format", "gguf", "--quant", "f32",
                  "--json"))
    assert f32["metadata"] == "hf" and f32["types"] == {"F32": len(values)}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="f32.gguf").state_dict()
    for name, value in values.items():  # q/k permuted for llama.cpp and back by transformers: bit for bit
        assert torch.equal(loaded[name], value), name
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="f32.gguf")
    assert tok(PROMPT).input_ids == make_tokenizer()(PROMPT).input_ids

    run(repo, "export", "HEAD", str(tmp_path / "out" / "q8.gguf"), "--format", "gguf", "--quant", "q8_0")
    types = types_of(tmp_path / "out" / "q8.gguf")
    assert {t for n, t in types.items() if "norm" in n or n.endswith(".bias")} == {"F32"}
    assert types["blk.1.ffn_down.weight"] == "Q8_0"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="q8.gguf").state_dict()
    for name, value in values.items():
        step = float(value.abs().max()) / 127  # Q8_0: int8 steps of a block's max / 127
        assert float((loaded[name] - value).abs().max()) <= step, name
    assert float((loaded[DOWN] - values[DOWN]).abs().max()) > 0  # really quantised


def test_a_gguf_base_keeps_its_metadata_and_tensor_types(tmp_path: Path) -> None:
    first = edited_repo(tmp_path / "a", "llama")
    source = tmp_path / "src" / "base.gguf"
    run(first, "export", "HEAD~1", str(source), "--format", "gguf", "--quant", "q4_1")
    repo = Repository.init(tmp_path / "work", str(source), progress=False)
    g = torch.Generator().manual_seed(2)
    rows, cols = repo.manifest()[DOWN].shape
    repo.commit({DOWN: LowRank(torch.randn(rows, 1, generator=g) * 0.1, torch.randn(1, cols, generator=g) * 0.1)},
                message="edit")
    out = tmp_path / "edited.gguf"
    result = doc(run(repo, "export", "HEAD", str(out), "--format", "gguf", "--json"))
    assert result["metadata"] == "source" and result["quant"] is None
    assert types_of(out) == types_of(source)  # Q4_1 matrices, F32 norms, as the source chose
    src, new = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.rope.dimension_count", "general.file_type"):
        assert new.fields[key].contents() == src.fields[key].contents(), key
    requant = tmp_path / "q8.gguf"
    run(repo, "export", "HEAD", str(requant), "--format", "gguf", "--quant", "q8_0")
    assert types_of(requant)["blk.0.attn_q.weight"] == "Q8_0" and types_of(requant)["output_norm.weight"] == "F32"
    assert gguf.GGUFReader(requant).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_adapters_and_unknown_architectures_are_refused(tmp_path: Path) -> None:
    repo = edited_repo(tmp_path, "llama")
    repo.commit({}, adapters=[Adapter("grace", {"keys": torch.zeros(1, 32)}, {"module": "model.layers.2.mlp"})],
                method="grace", message="grace")
    out = tmp_path / "out.gguf"
    err = run(repo, "export", "HEAD", str(out), "--format", "gguf", code=1)
    assert "grace adapter" in err and "kedit export REV DIR" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or "kedit-" in p.name] == []
    err = run(repo, "export", "HEAD~1", str(tmp_path), "--format", "gguf", "--force", code=1)
    assert "is a folder" in err
    err = run(repo, "export", "HEAD~1", str(out), "--quant", "q4_0", code=2)
    assert "--format gguf" in err
    gpt2 = tmp_path / "gpt2"
    make_model("gpt2", 128).save_pretrained(gpt2)
    other = Repository.init(tmp_path / "work-gpt2", str(gpt2), progress=False)
    err = run(other, "export", "HEAD", str(out), "--format", "gguf", code=1)
    assert "'gpt2'" in err and not out.exists()



def test_eval_and_check_with_quant_measure_what_the_gguf_file_holds(tmp_path: Path) -> None:
    from kedit.eval.revision import load_quantized

    repo = edited_repo(tmp_path, "llama")
    run(repo, "export", "HEAD", str(tmp_path / "out" / "q4.gguf"), "--format", "gguf", "--quant", "q4_1")
    from_file = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="q4.gguf").state_dict()
    model, _ = load_quantized(repo, "HEAD", "q4_1")
    for name, value in model.state_dict().items():  # the values transformers reads from the file, bit for bit
        assert torch.equal(value, from_file[name]), name

    suite = tmp_path / "edits.json"
    suite.write_text(json.dumps([{"prompt": PROMPT, "subject": "France", "target_new": "Japan",
                                  "target_true": "Paris", "locality_prompt": "Berlin is the capital of",
                                  "locality_ground_truth": "Germany"}]))
    plain = doc(run(repo, "eval", "--suite", str(suite), "--json"))["metrics"]
    quant = doc(run(repo, "eval", "--suite", str(suite), "--quant", "q4_0", "--json"))["metrics"]
    assert {m["suite"] for m in plain} == {"edits.json"} and {m["suite"] for m in quant} == {"edits.json@q4_0"}
    stored = {(m.name, m.suite) for m in repo.get_commit(repo.head()).metrics}
    assert {(m["name"], m["suite"]) for m in plain + quant} <= stored  # side by side
    run(repo, "probe", "add", "--prompt", PROMPT, "--answer", "Paris")
    result = CliRunner().invoke(cli, ["--repo", str(repo.root), "check", "--quant", "q4_0", "--json"])
    assert result.exit_code in (0, 1), result.stderr
    report = doc(result.stdout)
    assert len(report["results"]) == 1 and report["commit"] == repo.head()
