"""Shared fixtures: tiny random models of real architectures, and fresh repositories.

Every test runs offline, without progress bars, with the Hugging Face cache in a temp dir.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from kedit.repo import Repository

# Tiny configs of the real architectures (2 layers, 32-64 wide): enough to exercise every code path.
TINY_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    "gptj": lambda: transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                                            rotary_dim=8, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, vocab_size=128, bos_token_id=0,
                                                   eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                              tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "gemma": lambda: transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              vocab_size=128),
}


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("KEDIT_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("KEDIT_AUTHOR", "tester")
    monkeypatch.delenv("KEDIT_DIR", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def build_tiny_model(arch: str, folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of `arch` as a Hugging Face folder."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).to(dtype)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def repo(tmp_path: Path, tiny_llama_dir: Path) -> Repository:
    """A fresh repository over the tiny Llama, with a working model."""
    return Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)
