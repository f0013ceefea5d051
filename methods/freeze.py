"""Freezing a model while something else trains through it.

Every method that optimises a vector through a model (ROME's v*, MEMIT's δ, GRACE's values, MEND's
gradient factors and editor) needs no gradient for the model's own weights: each would cost a
backward matmul per weight. `frozen` turns them off for the duration and puts back each parameter's
own flag afterwards (and, with `eval_mode`, the model's training mode too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["frozen"]


@contextlib.contextmanager
def frozen(model: Any, *, eval_mode: bool = False) -> Iterator[None]:
    """No parameter of `model` requires a gradient inside; with `eval_mode` the model is also in eval
    mode (no dropout). Both are restored on exit, whatever happens inside."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if eval_mode:
        model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if eval_mode:
            model.train(training)
