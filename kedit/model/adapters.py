"""Adapters in a live model: each adapter kind has an installer that puts it into a transformers model.

The engine stores and versions adapters without reading them (kedit/core/delta.py `Adapter`); to
measure or use a revision that has some, the loaded model must carry them. An installer takes
the model and *all* adapters of its kind in effect, in the order they were committed, and makes
the model behave as that ordered list says, replacing whatever it installed before. Installing
the empty list removes them. Methods register installers for their kinds (GRACE: methods/grace.py),
so kedit/ knows nothing of any adapter's mathematics; an installer not yet registered is looked for
in the methods that declare `adapters` (kedit/core/plugins.py), whose modules register theirs.

Exported folders: the adapters go to `kedit_adapters/NNNN-<kind>.safetensors` (tensors, with the
kind and JSON config as metadata), and config.json's `model_type` is replaced by a name no
transformers release knows, so that a plain `AutoModelForCausalLM.from_pretrained` fails with that
name in its message instead of silently loading the model without its edits. The original
`model_type` and `architectures` are kept under `kedit_adapters` in config.json; `load_folder`
(and `kedit.load_model`) restores them, loads the weights and installs the adapters.

`AutoTokenizer.from_pretrained` reads config.json too: when AutoConfig refuses the marked type, it
parses the file as the generic `PreTrainedConfig` (model type ""), which warns that a model of type
"kedit-adapters: ..." is read as one of type "" unless some nested dict of the file has model type ""
(transformers then takes that dict, as it does a composite model's sub-config). So the marked file
carries `kedit_generic: {"model_type": ""}`: the tokenizer loads without the warning, and every
model class still refuses. Folders marked before that key existed load the same, with the warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kedit.core.delta import Adapter
from kedit.core.errors import KeditError
from kedit.core.names import check_adapter_file, check_adapter_kind
from kedit.core.plugins import declared_methods
from kedit.core.store import read_safetensors, save_tensors_atomic

__all__ = [
    "ADAPTER_DIR",
    "MARKED_MODEL_TYPE",
    "Installer",
    "adapter_path",
    "conflict_check",
    "install_adapters",
    "installed_kinds",
    "mark_config",
    "read_folder",
    "register_conflict_check",
    "register_installer",
    "write_adapters",
]

ADAPTER_DIR = "kedit_adapters"
# Shown by transformers as "model type `...` ... does not recognize this architecture".
MARKED_MODEL_TYPE = "kedit-adapters: load this folder with kedit.load_model(path)"
# What transformers' generic config reads of a marked config.json (see the module docstring).
_GENERIC_KEY = "kedit_generic"

Installer = Callable[[Any, list[Adapter]], None]

_INSTALLERS: dict[str, Installer] = {}
log = logging.getLogger(__name__)
_ATTR = "_kedit_adapter_kinds"


def register_installer(kind: str, installer: Installer) -> None:
    """Make `installer` the one that puts adapters of `kind` into models."""
    if kind in _INSTALLERS and _INSTALLERS[kind] is not installer:
        raise ValueError(f"an installer for adapter kind {kind!r} is already registered")
    _INSTALLERS[kind] = installer


def installer(kind: str) -> Installer:
    for method in declared_methods().values():
        if kind in _INSTALLERS:
            break
        if "adapters" in method.capabilities:
            try:
                method.load()
            except ImportError as e:  # a broken package must not hide the installers of the others
                log.warning("method %s (from %s) cannot be imported: %s", method.name, method.distribution, e)
    if kind not in _INSTALLERS:
        raise KeditError(f"no installer for adapter kind {kind!r}: this kedit cannot load that revision's adapters",
                         hint="install the package that provides the method which made it")
    return _INSTALLERS[kind]


# (our adapters, their adapters) of one kind -> [(our index, their index, what disagrees)]: the check
# `kedit merge` runs on the adapters each side added since the merge base (kedit.core.conflicts).
ConflictCheck = Callable[[list[Adapter], list[Adapter]], list[tuple[int, int, str]]]
_CONFLICT_CHECKS: dict[str, ConflictCheck] = {}


def register_conflict_check(kind: str, check: ConflictCheck) -> None:
    """Make `check` the one that says where two sides' adapters of `kind` disagree."""
    if kind in _CONFLICT_CHECKS and _CONFLICT_CHECKS[kind] is not check:
        raise ValueError(f"a conflict check for adapter kind {kind!r} is already registered")
    _CONFLICT_CHECKS[kind] = check


def conflict_check(kind: str, ours: list[Adapter], theirs: list[Adapter]) -> list[tuple[int, int, str]]:
    """The registered check of `kind` (none registered: no conflicts it could name)."""
    if kind not in _CONFLICT_CHECKS:
        installer(kind)  # loads the methods that declare adapters, which register their checks too
    check = _CONFLICT_CHECKS.get(kind)
    return check(ours, theirs) if check is not None else []


def installed_kinds(model: Any) -> frozenset[str]:
    return getattr(model, _ATTR, frozenset())


def install_adapters(model: Any, adapters: Sequence[Adapter]) -> None:
    """Make `model` carry exactly `adapters` (ordered as committed), removing earlier installs."""
    kinds = {a.kind for a in adapters}
    for kind in sorted(kinds | installed_kinds(model)):
        installer(kind)(model, [a for a in adapters if a.kind == kind])
    object.__setattr__(model, _ATTR, frozenset(kinds))


def adapter_path(index: int, kind: str) -> str:
    """Where the `index`-th adapter (in commit order) goes in an exported folder."""
    return f"{ADAPTER_DIR}/{index:04d}-{check_adapter_kind(kind)}.safetensors"


def write_adapters(folder: Path, adapters: Sequence[Adapter]) -> list[str]:
    """Write `adapters` in order under folder/kedit_adapters; returns their paths relative to folder."""
    paths = []
    for i, a in enumerate(adapters):
        rel = adapter_path(i, a.kind)
        save_tensors_atomic(rel, a.tensors, {"kind": a.kind, "config": json.dumps(a.config)}, root=folder)
        paths.append(rel)
    return paths


def mark_config(config_json: bytes, adapter_files: list[str]) -> bytes:
    """config.json that plain transformers refuses, with what kedit needs to restore it."""
    config = json.loads(config_json)
    config["kedit_adapters"] = {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
                                "files": adapter_files}
    config["model_type"] = MARKED_MODEL_TYPE
    config["architectures"] = ["KeditAdapters: load with kedit.load_model(path)"]
    config[_GENERIC_KEY] = {"model_type": ""}
    return json.dumps(config, indent=2, sort_keys=True).encode()


def read_folder(folder: Path) -> tuple[dict[str, Any] | None, list[Adapter]]:
    """(restored config dict, adapters) of an exported folder; (None, []) for a plain one."""
    path = folder / "config.json"
    if not path.is_file():
        return None, []
    config = json.loads(path.read_text())
    marker = config.pop("kedit_adapters", None)
    if marker is None:
        return None, []
    config.pop(_GENERIC_KEY, None)
    config["model_type"] = marker["model_type"]
    config["architectures"] = marker["architectures"]
    adapters = []
    for rel in marker["files"]:
        check_adapter_file(rel)  # a folder from elsewhere: its adapter files must lie inside it
        try:
            tensors, meta = read_safetensors(folder / rel)
        except (OSError, ValueError) as e:
            raise KeditError(f"{folder}: cannot read adapter {rel}: {e}") from e
        adapters.append(Adapter(meta["kind"], tensors, json.loads(meta.get("config", "{}"))))
    return config, adapters
