"""A revision as one GGUF file for llama.cpp and Ollama (`kedit export FILE.gguf --format gguf`).

Everything GGUF-specific comes from the `gguf` package: tensor names (`TensorNameMap`), the
writer, and the quantisers (`gguf.quants`); kedit writes no quantiser of its own. Two sources of
metadata:
  - the base came from a GGUF file (the embedded SmolLM2) and that file is still where `init` read
    it, holding the same base (its F32 output norm equals the base's, bit for bit): its key-values
    (architecture, tokenizer, chat template) are copied, and without `--quant` each tensor keeps the
    source's type (Q4_1 matrices, a Q8_0 embedding, F32 norms);
  - otherwise, llama.cpp's conversion conventions for a Hugging Face folder (`convert_hf_to_gguf.py`):
    the architecture keys from config.json, the GPT-2 style BPE tokenizer (`gguf.vocab.BpeVocab`,
    special tokens and merges by `gguf.SpecialVocab`), F16 matrices unless `--quant` says otherwise.
Llama's q/k projections are written in llama.cpp's rotary layout (the permutation the convert
script applies and transformers' GGUF loader reverses); Qwen2 needs none. Vectors (norms, biases)
stay F32, and a matrix whose rows are not whole quantisation blocks falls back to F16.

Caveats: a tokenizer with no `tokenizer.ggml.pre` that llama.cpp knows gets "default"
pre-tokenisation (the convert script refuses such tokenizers; llama.cpp loads them with a warning).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kedit.core import history
from kedit.core.errors import KeditError
from kedit.core.names import check_file_set
from kedit.core.repo import Repository
from kedit.model.quantize import QUANTS, ggml_type

ARCHITECTURES = ("llama", "qwen2")  # those transformers' GGUF reader and llama.cpp both know, and kedit tests
SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type")  # the writer's own, or rewritten


def _qtype(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def _file_type(quant: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[quant]


def llama_rotary_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs):
    `convert_hf_to_gguf.py`'s `LlamaModel.permute`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def source_gguf(repo: Repository, commit_id: str) -> Any:
    """A GGUFReader over the file the base was made from, if it is still there and holds this base."""
    import gguf

    root = history.ancestors(repo.db, commit_id)[-1]
    origin = repo.get_commit(root).info.get("origin", {})
    path = Path(origin.get("path", "")) if origin.get("kind") == "gguf" else None
    if path is None or not path.is_file():
        return None
    reader = gguf.GGUFReader(path)
    norm = next((t for t in reader.tensors if t.name == "output_norm.weight"), None)
    base = repo.manifest(root).get("model.norm.weight")
    if norm is None or base is None or norm.tensor_type != gguf.GGMLQuantizationType.F32:
        return None
    stored = repo.materializer.value(root, "model.norm.weight").to(torch.float32).numpy()
    return reader if np.array_equal(np.asarray(norm.data).reshape(stored.shape), stored) else None


def _copy_metadata(writer: Any, reader: Any) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(SKIPPED_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _hf_metadata(writer: Any, config: dict, folder: Path) -> None:
    """The key-values llama.cpp's convert script writes for a llama/qwen2 folder, and its tokenizer."""
    import gguf

    n_head = config["num_attention_heads"]
    writer.add_name(config.get("_name_or_path") or config["model_type"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta",
                                                                                                      10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    if config["model_type"] == "llama":
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise KeditError(f"kedit writes GGUF tokenizers of the GPT-2 BPE kind only, and this base's is not one ({e})",
                         hint="export a folder and convert it with llama.cpp's convert_hf_to_gguf.py") from None
    tokens, types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text)
        types.append(token_type)
    for i in range(len(tokens), config["vocab_size"]):  # the model's rows past the tokenizer: as the convert script
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tensor_type(name: str, value: torch.Tensor, quant: str | None, source_types: dict[str, Any]) -> Any:
    """The GGML type of one tensor: `ggml_type`'s rule for --quant, or the source's type, else F16."""
    import gguf

    asked = _qtype(quant) if quant else source_types.get(name, gguf.GGMLQuantizationType.F16)
    qtype = ggml_type(tuple(value.shape), asked)
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except NotImplementedError:  # a source type the package cannot write (a K-quant): the nearest it can
        return gguf.GGMLQuantizationType.Q8_0
    return qtype


def export_gguf(repo: Repository, rev: str, out_file: Path, *, quant: str | None = None,
                force: bool = False) -> dict:
    """Write `rev` as one GGUF file; returns what was written (per-type tensor counts included)."""
    import gguf

    if quant is not None and quant not in QUANTS:
        raise KeditError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if out_file.is_dir():
        raise KeditError(f"{out_file} is a folder: GGUF is one file", hint="give a file name, e.g. edited.gguf")
    if out_file.exists() and not force:
        raise KeditError(f"{out_file} exists", hint="choose another file name or pass --force")
    commit_id = repo.resolve(rev)
    adapters = repo.adapters(commit_id)
    if adapters:
        raise KeditError(f"{rev} holds {len(adapters)} {adapters[0][0].kind} adapter(s), which GGUF cannot carry; "
                         "export a full folder instead: kedit export REV DIR")
    files = repo.files(commit_id)
    if "config.json" not in files:
        raise KeditError("this repository's base has no config.json: GGUF needs the model's architecture")
    config = json.loads(files["config.json"])
    arch_name = config.get("model_type")
    if arch_name not in ARCHITECTURES:
        raise KeditError(f"kedit writes GGUF for {', '.join(ARCHITECTURES)} models, not {arch_name!r}",
                         hint="export a folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    manifest = history.manifest(repo.db, commit_id)
    mapped = {}
    for name in manifest:
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeditError(f"{name} has no GGUF name for {arch_name}")
        mapped[name] = gguf_name
    reader = source_gguf(repo, commit_id)
    source_types = {t.name: t.tensor_type for t in reader.tensors} if reader is not None else {}

    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.kedit-", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch_name)
        if reader is not None:
            _copy_metadata(writer, reader)
        else:
            with tempfile.TemporaryDirectory(prefix="kedit-gguf-tok-") as folder:
                check_file_set(files)
                for path, data in files.items():
                    (Path(folder) / path).parent.mkdir(parents=True, exist_ok=True)
                    (Path(folder) / path).write_bytes(data)
                _hf_metadata(writer, config, Path(folder))
        if quant or reader is None:
            writer.add_file_type(_file_type(quant or "f16"))
        else:  # the source's own, as its per-tensor types are kept
            writer.add_file_type(reader.fields["general.file_type"].contents())
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
        for name in sorted(manifest, key=lambda n: mapped[n]):
            value = repo.materializer.value(manifest[name].commit_id, name).to(torch.float32)
            if arch_name == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                value = llama_rotary_permute(value, n_head if name.endswith("q_proj.weight") else n_kv)
            qtype = _tensor_type(mapped[name], value, quant, source_types)
            data = gguf.quants.quantize(value.contiguous().numpy(), qtype)
            writer.add_tensor(mapped[name], data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"commit": commit_id, "path": str(out_file), "format": "gguf", "quant": quant,
            "metadata": "source" if reader is not None else "hf", "types": counts, "tensors": len(manifest),
            "bytes": out_file.stat().st_size}
