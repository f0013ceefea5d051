"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023), many facts in one update.

Steps:
1. for every request a target z = h + δ for the residual stream (the output of the last edited
   block) at the subject's last token, δ optimised as ROME's v* (`values.optimise_batched_values`,
   all requests of a chunk in one batch per step);
2. for each edited layer l, ascending: the template-averaged keys K_l with the layers below
   already updated, the residual R = Z − H (H recomputed now), its share R / (layers left), and
   the closed form Δ_l = R_l K_lᵀ (λC_l + K_lK_lᵀ)⁻¹ in float64 (`memit_math.memit_update`);
   Δ_l is added before the next layer's keys are read.
The model is restored on return; the result is one low-rank delta per edited layer (rank = number
of requests), which the repository stores as factors while they are smaller than a dense delta.

The pipeline (targets, keys, spreading) is in methods/spread.py, shared with AlphaEdit; here is
MEMIT's per-layer solver and `apply`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from kedit.methods import memit_math
from kedit.methods.base import EditRequest, EditResult, register_method
from kedit.methods.spread import MEMITHyperParams, StatsProvider, second_moments, spread_over_layers

__all__ = ["MEMITHyperParams", "apply"]


def apply(
    model: Any,
    tok: Any,
    requests: Sequence[EditRequest],
    hparams: MEMITHyperParams,
    *,
    stats_provider: StatsProvider | None = None,
    second_moments_by_layer: dict[int, torch.Tensor] | None = None,
) -> EditResult:
    """MEMIT's deltas for all the requests at once; the model is left unchanged."""
    if not requests:
        raise ValueError("MEMIT needs at least one request")
    t0 = time.perf_counter()
    cs = second_moments(model, hparams, stats_provider, second_moments_by_layer)

    def solve(layer: int, _name: str, resid: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return memit_math.memit_update(resid, keys, cs[layer], hparams.mom2_update_weight, hparams.mom2_ridge)

    deltas, _keys, info = spread_over_layers(model, tok, requests, hparams, solve)
    info.update(method="memit", mom2_adjustment=hparams.mom2_adjustment, total_s=round(time.perf_counter() - t0, 3))
    return EditResult(deltas=dict(deltas), info=info)


register_method("memit", MEMITHyperParams, apply)
