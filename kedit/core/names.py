"""Names that come from outside, checked against one strict grammar, and the one safe destination.

Tensor names, file paths, object and commit ids, adapter kinds and Hub paths arrive in model
files, in `kedit init`'s sources and in records downloaded from the Hub. A hash proves that a
record was not changed in transit, not that it is safe: a record whose id is right can still
name a file `../../../x`. So every such name is checked here before anything is written, and
every write whose destination is built from one goes through `inside(root, path)`, which
refuses a destination that resolves outside its root (defence in depth, after the grammar).

Calling sequence: `check_tensor_name`, `check_file_path`, `check_plain_name`, `check_hub_path`,
`check_hub_commit`, `check_id`, `check_adapter_kind` and `check_adapter_file` return the name or
raise BadNameError saying what is wrong; `check_commit_document` checks every name of one
downloaded commit document (after `hub.verify_document` has checked its shape and hash), and
`check_fetched` all that a fetch brought; `loads_unique` parses JSON that may not repeat a key.
Ref names (branches, tags, remotes) are checked by `refs.check_ref_name`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kedit.core.errors import BadNameError
from kedit.core.refs import check_ref_name

# The dtypes a model is loaded or stored in, by torch's name (`--dtype`; `kedit.model.load.parse_dtype`
# turns a name into the torch dtype). The one table of them; names only, so the CLI needs no torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

MAX_NAME = 512
MAX_PATH = 1024
MAX_PATH_PARTS = 8

ID_RE = re.compile(r"^[0-9a-f]{32}$")
_HUB_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# transformers' state-dict keys: dotted identifiers, e.g. model.layers.5.mlp.down_proj.weight
_TENSOR_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
# one folder or file name of a config/tokenizer/adapter file: no leading '.', no separators
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@,-]{0,254}$")
# one part of a path in a Hub repository (kedit's own live under .kedit/)
_HUB_PART_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.+=@,-]{0,254}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# what kedit itself writes beside the weights: a stored file of that name would overwrite it
_WRITTEN_BY_KEDIT = frozenset({"model.safetensors.index.json", "kedit.json"})
_WRITTEN_SUFFIXES = (".safetensors",)
_ADAPTER_DIR = "kedit_adapters"
_ADAPTER_FILE_RE = re.compile(rf"^{_ADAPTER_DIR}/[0-9]{{4}}-[a-z][a-z0-9_-]{{0,63}}\.safetensors$")


def _refuse(what: str, name: Any, why: str) -> BadNameError:
    return BadNameError(f"unsafe {what} {str(name)[:120]!r}: {why}")


def check_tensor_name(name: Any, what: str = "tensor name") -> str:
    """A state-dict key: dot-separated parts of letters, digits, '_' and '-'."""
    if not isinstance(name, str) or not name:
        raise _refuse(what, name, "it is empty or not text")
    if len(name) > MAX_NAME:
        raise _refuse(what, name, f"it is longer than {MAX_NAME} characters")
    if not _TENSOR_RE.match(name):
        raise _refuse(what, name, "use dot-separated parts of letters, digits, '_' and '-' "
                      "(no '/', '\\', '..', leading '.', spaces or control characters)")
    return name


def check_file_path(path: Any, what: str = "file name") -> str:
    """A config, tokenizer or adapter file: a plain name or a short relative path, every part
    starting with a letter, digit or '_' (so no '..', hidden or absolute parts), and not a
    file that kedit writes itself (weights, the index, kedit.json)."""
    parts = _split(path, what)
    for part in parts:
        check_plain_name(part, what, path)
    if path in _WRITTEN_BY_KEDIT or path.endswith(_WRITTEN_SUFFIXES) or parts[0] == _ADAPTER_DIR:
        raise _refuse(what, path, "kedit writes a file of that name itself")
    return path


def check_plain_name(name: Any, what: str = "file name", whole: Any = None) -> str:
    """One file or folder name (e.g. a shard listed in a safetensors index): no separators, no
    leading '.', only letters, digits and . _ - + = @ ,"""
    if not isinstance(name, str) or not _FILE_PART_RE.match(name):
        raise _refuse(what, name if whole is None else whole,
                      "each part must start with a letter, digit or '_' and hold only letters, digits and "
                      ". _ - + = @ , (no '..', '/', '\\', absolute paths or control characters)")
    return name


def check_hub_path(path: Any) -> str:
    """A path inside a Hub repository that kedit downloads: relative, no '.' or '..' parts."""
    parts = _split(path, "Hub path")
    if any(part in (".", "..") or not _HUB_PART_RE.match(part) for part in parts):
        raise _refuse("Hub path", path, "it must be a relative path without '..', '\\' or control characters")
    return path


def _split(path: Any, what: str) -> list[str]:
    if not isinstance(path, str) or not path:
        raise _refuse(what, path, "it is empty or not text")
    if len(path) > MAX_PATH:
        raise _refuse(what, path, f"it is longer than {MAX_PATH} characters")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise _refuse(what, path, "it is an absolute path")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise _refuse(what, path, "it holds a backslash or a control character")
    parts = path.split("/")
    if ".." in parts:
        raise _refuse(what, path, "it climbs out of its folder with '..'")
    if len(parts) > MAX_PATH_PARTS or "" in parts:
        raise _refuse(what, path, f"it must be a relative path of at most {MAX_PATH_PARTS} non-empty parts")
    return parts


def check_id(value: Any, what: str = "object id") -> str:
    """A commit or object id: 32 lower-case hex digits (xxh3_128)."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise _refuse(what, value, "it is not 32 lower-case hex digits")
    return value


def check_hub_commit(sha: Any) -> str:
    """A Hub (git) commit sha: 40 lower-case hex digits; it names a download folder."""
    if not isinstance(sha, str) or not _HUB_SHA_RE.match(sha):
        raise _refuse("Hub commit", sha, "it is not 40 lower-case hex digits")
    return sha


def check_adapter_kind(kind: Any) -> str:
    """An adapter kind names its exported file (kedit_adapters/NNNN-<kind>.safetensors)."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise _refuse("adapter kind", kind, "use lower-case letters, digits, '_' and '-', starting with a letter")
    return kind


def check_adapter_file(path: Any) -> str:
    """An adapter file of an exported folder, as `adapters.adapter_path` names it."""
    if not isinstance(path, str) or not _ADAPTER_FILE_RE.match(path):
        raise _refuse("adapter file name", path, f"expected {_ADAPTER_DIR}/NNNN-<kind>.safetensors")
    return path


def check_unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _refuse(what, name, "it appears twice")
        seen.add(name)


def check_file_set(paths: Iterable[str]) -> None:
    """File paths that can all be written: each safe, none twice, none a folder of another."""
    paths = [check_file_path(p) for p in paths]
    check_unique(paths, "file name")
    folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    clash = sorted(folders & set(paths))
    if clash:
        raise _refuse("file name", clash[0], "it is both a file and a folder")


def loads_unique(text: str | bytes) -> Any:
    """json.loads, refusing an object that repeats a key (json.loads would keep the last)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        check_unique((k for k, _ in items), "JSON key")
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs)


def check_commit_document(doc: dict[str, Any]) -> None:
    """Every name in a downloaded commit document (shape and hash already verified)."""
    check_id(doc["id"], "commit id")
    for parent in doc.get("parents") or ([doc["parent"]] if doc["parent"] is not None else []):
        check_id(parent, "parent commit id")
    loads_unique(doc["record"])  # the hashed record may not hide a second value under one key
    check_unique((ch["name"] for ch in doc["changes"]), "tensor name")
    for ch in doc["changes"]:
        check_tensor_name(ch["name"])
        if ch["source"] is not None:
            check_id(ch["source"], "source commit id")
        for origin, oid, _encoding in ch["steps"]:
            check_id(origin, "commit id")
            check_id(oid)
    for _op, oid, kind, origin in doc["adapter_ops"]:
        check_id(oid)
        check_adapter_kind(kind)
        check_id(origin, "commit id")
    check_file_set(doc["files"])
    for oid in doc["files"].values():
        check_id(oid)
    if doc.get("memory"):
        check_id(doc["memory"]["object_id"])


def check_fetched(branches: Iterable[str], docs: dict[str, dict[str, Any]], editors: Iterable[str]) -> None:
    """Every name a fetch brought (Hub branches, commit documents, editor ids), before any is
    written: one bad name refuses the whole fetch."""
    for branch in branches:
        check_ref_name(branch, "remote branch")
    for doc in docs.values():
        check_commit_document(doc)
    for editor_id in editors:
        check_id(editor_id, "editor id")


def inside(root: Path, path: Path | str) -> Path:
    """The destination `path` (relative to `root`, or absolute) if it resolves inside `root`.

    Symbolic links are followed, so a link planted in the folder cannot carry a write out of
    it either. Raises BadNameError otherwise; nothing is created.
    """
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, path))
    if os.path.commonpath([base, target]) != base or target == base:
        raise BadNameError(f"refused to write {str(path)[:200]!r}: it is outside {root}")
    return Path(target)
