"""Load any revision of a repository (or an exported folder) as a transformers model and tokenizer.

Adapters in effect at the revision (GRACE codebooks) are installed into the loaded model
(kedit/model/adapters.py), so what is measured or used is the edited model.

HEAD loads straight from the working model (memory-mapped safetensors), unless a checkout
rewrote it while it was read (its index file changed: then the model could mix two commits);
any other revision is exported to a temporary folder first, so that transformers builds the model exactly as it
would from a checkpoint on disk (buffers, tied weights, dtype handling all its own).
A model placed with `device="auto"` keeps that folder while it lives: accelerate reads the layers
it offloaded to disk from those files (kedit/model/placement.py).
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from kedit.core.errors import KeditError
from kedit.core.names import DTYPE_NAMES
from kedit.core.progress import progress_enabled
from kedit.core.refs import short_id
from kedit.core.repo import Repository
from kedit.model.adapters import install_adapters, read_folder
from kedit.model.placement import Placement, loading_kwargs

log = logging.getLogger(__name__)



def parse_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a name in DTYPE_NAMES; None for None or "auto" (as stored)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise KeditError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def _from_folder(folder: Path, dtype: torch.dtype | None, device: str, device_map: str | None,
                 placement: Placement | None = None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress_enabled():
        hf_logging.disable_progress_bar()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KeditError("--device cuda was asked for, but torch sees no CUDA device")
    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if device_map:
        kwargs.update(loading_kwargs("auto", placement))
    config_dict, adapters = read_folder(folder)  # an export with adapters: its real config and the adapters
    try:
        if config_dict is not None:
            config_dict = dict(config_dict)
            kwargs["config"] = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "config"})
    except (OSError, ValueError) as e:
        raise KeditError(f"transformers cannot build a model from this revision: {e}") from e
    install_adapters(model, adapters)
    if not device_map:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_folder(folder: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
                placement: Placement | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder `kedit export` wrote (or any Hugging Face folder), adapters installed."""
    loading_kwargs(device, placement)  # placement options without --device auto are refused before loading
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise KeditError(f"{folder} has no config.json: not a model folder")
    device_map = None
    if device == "auto":
        device, device_map = "cpu", "auto"
    return _from_folder(folder, dtype, device, device_map, placement)


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identifies one version of a file written by atomic rename (a new inode each time)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def load_revision(repo: Repository, rev: str = "HEAD", *, dtype: torch.dtype | None = None, device: str = "cpu",
                  device_map: str | None = None, placement: Placement | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) at `rev`, in `dtype` (default: as stored) on `device`.

    `device="auto"` spreads a model too large for one device over the GPUs and the CPU
    (accelerate's `device_map="auto"`), within `placement`'s memory per device, offloading the
    rest to its folder on disk (kedit/model/placement.py).
    """
    loading_kwargs(device, placement)  # placement options without --device auto are refused before loading
    if device == "auto":
        device, device_map = "cpu", "auto"
    commit_id = repo.resolve(rev)
    if not repo.files(commit_id).get("config.json"):
        raise KeditError("this repository's base has no config.json, so it cannot be loaded as a model",
                         hint="init from a Hugging Face folder rather than a bare .safetensors file")
    wt = repo.worktree
    if wt is not None and wt.commit == commit_id and not wt.modified():
        before = _stamp(wt.index_path)
        model, tokenizer = _from_folder(wt.folder, dtype, device, device_map, placement)
        if _stamp(wt.index_path) == before:
            install_adapters(model, [a for _, a in repo.adapters(commit_id)])  # the working model holds weights only
            return model, tokenizer
        log.info("the working model changed while it was read; loading %s from the repository", short_id(commit_id))
    from kedit.model.export import export

    tmp = tempfile.TemporaryDirectory(prefix="kedit-load-")
    try:
        folder = Path(tmp.name) / "model"
        export(repo, commit_id, folder)
        model, tokenizer = _from_folder(folder, dtype, device, device_map, placement)
    except BaseException:
        tmp.cleanup()
        raise
    if device_map:  # layers offloaded to disk are read from the exported files: they live as long as the model
        weakref.finalize(model, tmp.cleanup)
    else:
        tmp.cleanup()
    return model, tokenizer
