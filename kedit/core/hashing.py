"""Content hashes: xxh3_128 over bytes and records (`kedit.core.tensors.hash_tensor` over tensors).

xxh3_128 runs at memory speed (~30 GB/s on one core), so hashing never dominates a command.
It is not cryptographic: it detects damage and names content, it does not defend against an
adversary. SHA-256 is used only where the Hugging Face Hub needs it.
"""

from __future__ import annotations

import json
from typing import Any

import xxhash

# Types of stored object, hashed into their ids so that two kinds never share one.
TENSORS = "tensors"
BLOB = "blob"

def hash_bytes(data: bytes | memoryview, kind: str = BLOB) -> str:
    h = xxhash.xxh3_128()
    h.update(f"{kind}\0".encode())
    h.update(data)
    return h.hexdigest()


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: the form that record ids are computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def tensors_object_id(tensor_hashes: dict[str, str], metadata: dict[str, str]) -> str:
    """Id of a tensors object, from its tensors' hashes: one pass over the bytes serves both."""
    return hash_bytes(canonical_json({"tensors": tensor_hashes, "metadata": metadata}), kind=TENSORS)


def record_id(record: dict[str, Any]) -> str:
    """Id of a commit (or any) record: xxh3_128 of its canonical JSON."""
    return hash_bytes(canonical_json(record), kind="record")
