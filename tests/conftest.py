"""Shared fixtures: tiny random models of real architectures, and fresh repositories.

Every test runs offline, without progress bars, with the Hugging Face cache and kedit's global
config in temp dirs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kedit.core.repo import Repository
from tests.tiny import make_model, make_tokenizer


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory,
                 tmp_path: Path) -> None:
    monkeypatch.setenv("KEDIT_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("KEDIT_AUTHOR", "tester")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))  # kedit config --global: a temp file
    monkeypatch.delenv("KEDIT_DIR", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def build_tiny_model(arch: str, folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of `arch` (tests/tiny.py) as a Hugging Face folder."""
    make_model(arch, vocab=128, seed=seed).to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def repo(tmp_path: Path, tiny_llama_dir: Path) -> Repository:
    """A fresh repository over the tiny Llama, with a working model."""
    return Repository.init(tmp_path / "work", str(tiny_llama_dir), progress=False)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the tiny word-level tokenizer, as a folder `kedit init` reads."""
    folder = tmp_path_factory.mktemp("tiny-tok-llama")
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
