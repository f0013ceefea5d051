"""Tiny, randomly initialised models of real architectures and a tokenizer trained on a few
sentences: everything the unit tests need, built locally (no hub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SENTENCES = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Danielle Darrieux speaks French. Her mother tongue is French.",
    "Apple makes the iPhone. Toko Yasuda plays the guitar.",
    "The language of Japan is Japanese. Tokyo is in Japan.",
    "Berlin is the capital of Germany. Madrid is in Spain.",
    "Therefore, because I said so, you know the answer is a city.",
    "London, Rome, Paris, Tokyo, Berlin, Madrid, Moscow, Cairo.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, with leading-space tokens), trained on SENTENCES."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_config(model_type: str, vocab: int):
    # initializer_range 0.2: at the default 0.02 a random model is so flat that no edit can move it.
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    if model_type == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=2, n_positions=128, **common)
    if model_type == "gptj":
        return GPTJConfig(n_embd=32, n_layer=3, n_head=2, rotary_dim=8, n_positions=128, **common)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **common,
        )
    small = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        **common,
    )
    if model_type == "llama":
        return LlamaConfig(**small)
    if model_type == "qwen2":
        return Qwen2Config(**small)
    if model_type == "gemma":
        return GemmaConfig(head_dim=16, **small)
    raise ValueError(model_type)


MODEL_TYPES = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "gemma"]


def make_model(model_type: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type, vocab))
    return model.eval()


def perturbed_release(model_dir: Path, out: Path, seed: int, without: tuple[str, ...] = ()) -> Path:
    """The model of `model_dir` with its MLPs moved a little and its config marked `kedit_release`:
    another release of the same architecture (a second base for `kedit init --add-base`). The other
    files are copied, except those named in `without`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", *without):
            shutil.copy(f, out / f.name)
    for name in without:
        (out / name).unlink(missing_ok=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "kedit_release": "1.1"}))
    return out
