"""Trained editors (MEND, InstructEdit) as artifacts of the repository.

An editor is a network trained for one base model. It is stored like any object: a safetensors
file named by the hash of its content (its id), with the method and the structure it needs in the
file's metadata. The `editors` table records, per editor, the base commit it was trained on, the
hash of its training and validation data, its training hyper-parameters and its validation
metrics, with the prompt protocol it was trained and validated under (`prompt_protocol`). A commit
made with an editor names it in its hyper-parameters (`editor`) and info.

Calling sequence:
    info = train_editor(repo, TrainOptions(method="mend", data=[Path("train.json")]))
    list_editors(repo); resolve_editor(repo, "mend", None)   # None: the latest for this base
    load = editor_loader(repo); tensors, meta = load(info.id)  # what methods get

Training checkpoints live in `.kedit/training/<run>/checkpoint.safetensors`: the tensors, and
the run's JSON state in the file's metadata, so one atomic rename replaces both. A run is named
by the hash of (method, base, data, hyper-parameters but not the budget: max_steps, max_minutes,
patience): the same command resumes where it stopped, and a larger budget continues a finished
run; `restart` starts over. The folder is removed when a run stops early (validation).

Caveats: training holds no lock (it can take an hour); only storing the result takes the
writer lock. `kedit gc` keeps every recorded editor.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedit.core import db as dbm
from kedit.core import tables
from kedit.core.errors import KeditError
from kedit.core.hashing import canonical_json, hash_bytes
from kedit.core.progress import progress_bar
from kedit.core.refs import now_iso, short_id
from kedit.core.repo import Repository
from kedit.core.store import read_safetensors, save_tensors_atomic
from kedit.core.tensors import require_finite
from kedit.eval.metrics import PROMPT_PROTOCOL

if TYPE_CHECKING:
    import torch

__all__ = ["EditorInfo", "TrainOptions", "editor_loader", "list_editors", "resolve_editor", "train_editor"]

log = logging.getLogger(__name__)

TRAINING_DIR = "training"
CHECKPOINT_FILE = "checkpoint.safetensors"


class EditorNotFoundError(KeditError, LookupError):
    """No stored editor matches the method, base or id asked for."""


@dataclass(frozen=True)
class EditorInfo:
    id: str
    method: str
    base_commit: str
    data_hash: str
    hparams: dict[str, Any]
    metrics: dict[str, Any]
    created: str
    size: int = 0
    used_by: list[str] = field(default_factory=list)  # commits made with it

    @property
    def short(self) -> str:
        return short_id(self.id)

    @property
    def prompt_protocol(self) -> str | None:
        """How its training fed prompts (None: before kedit named it, after a private start token)."""
        return self.metrics.get("prompt_protocol")


def _row_to_info(repo: Repository, row: dict[str, Any]) -> EditorInfo:
    used = tables.commits_using_editor(repo.db, row["id"])
    return EditorInfo(row["id"], row["method"], row["base_commit"], row["data_hash"], json.loads(row["hparams"]),
                      json.loads(row["metrics"]), row["created"], repo.store.size(row["id"]), used)


def list_editors(repo: Repository, method: str | None = None) -> list[EditorInfo]:
    """Stored editors, newest first."""
    return [_row_to_info(repo, r) for r in tables.editor_rows(repo.db, method)]


def base_commit(repo: Repository) -> str:
    """The repository's base: the first commit of HEAD's history."""
    return repo.log("HEAD")[-1].id


def _retrain_hint(method: str) -> str:
    return f"run 'kedit train-editor --method {method} --data FILE'"


def resolve_editor(repo: Repository, method: str, ref: str | None) -> EditorInfo:
    """The editor `ref` names (an id or a unique prefix of 4+ characters), or the latest for this base.

    Only editors trained under the current prompt protocol (`kedit.eval.metrics.PROMPT_PROTOCOL`, kept in
    their metrics) are used: one trained on prompts after a private start token learnt keys that the
    prompts users send do not produce."""
    if ref is None:
        base = base_commit(repo)
        found = [e for e in list_editors(repo, method) if e.base_commit == base]
        current = [e for e in found if e.prompt_protocol == PROMPT_PROTOCOL]
        if not current:
            old = f" ({len(found)} trained under an older prompt protocol)" if found else ""
            raise EditorNotFoundError(f"no trained {method} editor for this repository's base model{old}",
                                      hint=_retrain_hint(method))
        return current[0]
    if len(ref) < 4:
        raise EditorNotFoundError(f"editor id {ref!r} is too short (give at least 4 characters)")
    rows = tables.editor_rows_by_prefix(repo.db, ref.lower())
    if not rows:
        raise EditorNotFoundError(f"no editor {ref!r}", hint="'kedit editors' lists them")
    if len(rows) > 1:
        raise EditorNotFoundError(f"editor id {ref!r} is ambiguous ({len(rows)} editors start with it)")
    info = _row_to_info(repo, rows[0])
    if info.method != method:
        raise EditorNotFoundError(f"editor {info.short} was trained for {info.method}, not {method}",
                                  hint=f"use --method {info.method}")
    if info.prompt_protocol != PROMPT_PROTOCOL:
        raise EditorNotFoundError(f"editor {info.short} was trained under an older prompt protocol (a start "
                                  f"token before every prompt), not on prompts as users send them",
                                  hint=_retrain_hint(method))
    return info


def editor_loader(repo: Repository) -> Callable[[str], tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """What a method gets: editor id -> (state tensors, metadata: method, config)."""

    def load(editor_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = repo.store.get_tensors(editor_id)
        if meta.get("kind") != "editor":
            raise EditorNotFoundError(f"object {short_id(editor_id)} is not an editor")
        return tensors, {"method": meta.get("method"), "config": json.loads(meta["config"])}

    return load


def store_editor(repo: Repository, method: str, state: dict[str, torch.Tensor], config: dict[str, Any],
                 base: str, data_hash: str, hparams: dict[str, Any], metrics: dict[str, Any]) -> EditorInfo:
    """Put the editor's weights in the object store and record it (the same weights: the same id)."""
    require_finite(state, f"the trained {method} editor")
    with repo.lock():
        obj = repo.store.put_tensors(state, {"kind": "editor", "method": method,
                                             "config": canonical_json(config).decode()})
        with dbm.write(repo.db):
            tables.insert_editor(repo.db, {
                "id": obj.id, "method": method, "base_commit": base, "data_hash": data_hash,
                "hparams": canonical_json(hparams).decode(), "metrics": json.dumps(metrics), "created": now_iso()})
    return resolve_editor(repo, method, obj.id)


# ---------------------------------------------------------------------------------------------
# training


class RunCheckpoint:
    """One training run's checkpoint: tensors plus the JSON state in the safetensors metadata."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / CHECKPOINT_FILE

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not self.path.exists():
            return None
        try:
            tensors, meta = read_safetensors(self.path)
            return tensors, json.loads(meta["state"])
        except (OSError, ValueError, KeyError) as e:
            raise KeditError(f"the training checkpoint {self.path} cannot be read ({e})",
                             hint="pass --restart to start the run over") from e

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(self.path, tensors, {"state": json.dumps(state)})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# How long a run may go on: not part of the run's identity, so a larger budget continues it.
_BUDGET = frozenset({"max_steps", "max_minutes", "patience", "checkpoint_every"})


@dataclass
class TrainOptions:
    method: str = "mend"
    data: Sequence[Path] = ()
    val: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    hparams_file: Path | None = None
    device: str = "auto"  # auto: a GPU when there is one
    restart: bool = False
    progress: bool = False


def _device(name: str) -> str:
    if name == "auto":
        import torch  # here: listing the editors (kedit editors) never needs torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def data_hash(train: Sequence[Any], val: Sequence[Any]) -> str:
    """xxh3_128 of the training and validation records as parsed (request and task)."""
    as_json = lambda items: [{"task": it.task, **it.request.to_dict()} for it in items]  # noqa: E731
    return hash_bytes(canonical_json({"train": as_json(train), "val": as_json(val)}))


def train_editor(repo: Repository, options: TrainOptions) -> EditorInfo:
    """Train an editor for the repository's base model, checkpointing, and store it."""
    from kedit.edit.requests import load_training_requests
    from kedit.methods.base import TrainItem, get_method, method_names
    from kedit.methods.hparams import hparams_from_overrides, hparams_to_dict
    from kedit.model.load import load_revision

    method = get_method(options.method)
    if not method.has("editor"):  # register_method made sure such a method has train and train_hparams_cls
        raise KeditError(f"{method.name} has no editor to train (methods with one: "
                         f"{', '.join(method_names('editor'))})")
    if not options.data:
        raise KeditError("give the training data: --data FILE (repeatable)")
    items = [TrainItem(r, task) for r, task in load_training_requests(options.data)]
    val = [TrainItem(r, task) for r, task in load_training_requests([options.val])] if options.val else []
    base = base_commit(repo)
    model, tok = load_revision(repo, base, device=_device(options.device))
    try:
        params = hparams_from_overrides(method.train_hparams_cls, model, options.overrides, options.hparams_file)
    except (ValueError, TypeError, OSError) as e:
        raise KeditError(f"bad training hyper-parameters for {method.name}: {e}") from e
    if not val:  # held out evenly across the data, so that every file and task family validates
        n_val = min(params.val_size, len(items) // 5)
        if n_val < 1:
            raise KeditError(f"{len(items)} training records are too few to hold some out for validation",
                             hint="give more records, or a --val FILE")
        held = {round((k + 0.5) * len(items) / n_val) for k in range(n_val)}
        items, val = [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
    hp = hparams_to_dict(params)
    dhash = data_hash(items, val)
    shape = {k: v for k, v in hp.items() if k not in _BUDGET}
    run = hash_bytes(canonical_json({"method": method.name, "base": base, "data": dhash, "hparams": shape,
                                     "prompt_protocol": PROMPT_PROTOCOL}))
    checkpoint = RunCheckpoint(repo.path / TRAINING_DIR / run[:16])
    if options.restart:
        checkpoint.remove()
    log.info("training a %s editor on %d records (%d for validation), %d tasks; checkpoints in %s",
             method.name, len(items), len(val), len({it.task for it in items}), checkpoint.folder)
    try:
        result = method.train(model, tok, items, val, params, checkpoint=checkpoint,
                              progress=functools.partial(progress_bar, disable=not options.progress))
    except ValueError as e:
        raise KeditError(f"{method.name} training: {e}") from e
    metrics = {**result.metrics, "tasks": sorted({it.task for it in items}), "history": result.history,
               "prompt_protocol": PROMPT_PROTOCOL}
    info = store_editor(repo, method.name, result.state, result.config, base, dhash, hp, metrics)
    if result.metrics.get("stopped") == "early_stopping":  # done; a budget stop may be continued
        checkpoint.remove()
    return info
