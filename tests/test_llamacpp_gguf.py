"""llama.cpp itself runs what `kedit export --format gguf` writes: tiny Llama and Qwen2 revisions at
f32, loaded by `llama_cpp.Llama`, give transformers' logits on the same token ids.

llama-cpp-python is built from source (a slow build), so it is not a dependency: without it these
tests are skipped with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_export_gguf import PROMPT, edited_repo, run
from tests.tiny import make_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (built from source, optional)")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llamacpp_logits_match_transformers_at_f32(tmp_path: Path, arch: str) -> None:
    from kedit.model.load import load_revision

    repo = edited_repo(tmp_path, arch)
    out = tmp_path / f"{arch}.gguf"
    run(repo, "export", "HEAD", str(out), "--format", "gguf", "--quant", "f32")
    ids = make_tokenizer()(PROMPT).input_ids
    model, _ = load_revision(repo, "HEAD")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()

    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=64, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # cache as f16 by default
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max())), arch
    assert (got.argmax(-1) == expected.argmax(-1)).all()
