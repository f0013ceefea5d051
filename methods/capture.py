"""A module's input (or output) for a batch, with the forward pass stopped there.

Keys for ROME, MEMIT and the covariance statistics are read at a layer near the bottom of the
model; running the layers above it would be wasted, so the hook raises once it has the tensor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["capture_at_module"]


class _Captured(Exception):
    """Raised by a capture hook: nothing above the module is needed, so the forward pass stops."""


@torch.no_grad()
def capture_at_module(model: Any, module: Any, ids: torch.Tensor, mask: torch.Tensor, *,
                      output: bool = False) -> torch.Tensor:
    """The module's input (or output) for a batch, (B, T, d); the layers above it are not run."""
    captured: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        captured.append(x.detach())
        raise _Captured

    if output:
        handle = module.register_forward_hook(lambda _m, _a, o: grab(o[0] if isinstance(o, tuple) else o))
    else:
        handle = module.register_forward_pre_hook(lambda _m, a: grab(a[0]))
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]
