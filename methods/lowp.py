"""Low-precision copies of the frozen layers a δ optimisation only differentiates through.

ROME's v* and MEMIT's δ are trained through every layer above the edited one. Those weights are
frozen, and a step reads each of them twice (forward, input gradient): on a CPU that memory
traffic, not arithmetic, is most of the step. A bfloat16 copy halves it and runs on the CPU's
bf16 matrix units; δ, the edited layer and the loss stay in float32, so only the activations
above the edit are rounded. On SmolLM2 a ROME v* step (head and loss included) went from 0.265 s
to 0.215 s with the same scores (bench/results/rome_counterfact_100.md).

Attention in the copies runs eagerly: PyTorch's CPU flash-attention backward is several times
slower in bfloat16 than in float32, and eager attention over a few dozen columns costs little.
A copy is kept while its original's weights are unchanged (same storage, same in-place version),
so a series of edits, each changing one layer, converts the others once. Modules with hooks
(GRACE's codebook, another tool's) are not copied: a copy would carry a snapshot of the hook's
state in the wrong dtype, so callers run them as they are (`has_hooks`). Neither are modules that
accelerate placed (`--device auto`): an offloaded layer's weights are on disk, and a copy would
hold them all in memory, rounded. Either way the value fit reports the dtype the layers really ran
in, and the commit records that as its `v_dtype` (kedit/edit/run.py), so a replay computes the same.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from kedit.model.placement import is_placed

__all__ = ["DTYPES", "check_dtype", "dtype_name", "has_hooks", "low_precision"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[tuple[int, int], ...], torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def check_dtype(name: str) -> None:
    """Reject a dtype name a hyper-parameter file could carry that is not one of DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"v_dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The name a hyper-parameter file gives `dtype` ("float32" for torch.float32): what a commit records."""
    return str(dtype).removeprefix("torch.")


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether any submodule has forward hooks or pre-hooks (whose state a copy would freeze), or was
    placed by accelerate (whose hook holds the weights of an offloaded layer)."""
    return any(m._forward_hooks or m._forward_pre_hooks or is_placed(m) for m in module.modules())


def _signature(module: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


def low_precision(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype`, frozen, with eager attention: a cached copy, or `module` if already in it."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    if has_hooks(module):
        raise ValueError("a module with hooks cannot be copied: its hooks' state would be frozen")
    signature = _signature(module)
    hit = _COPIES.get(module)
    if hit is not None and hit[0] == signature:
        return hit[1]
    low = copy.deepcopy(module).to(dtype).requires_grad_(False)
    for sub in low.modules():
        config: Any = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"  # the deep copy has its own config
    _COPIES[module] = (signature, low)
    return low
