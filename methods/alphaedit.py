"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of preserved keys.

Targets, keys and residual spreading are MEMIT's (`spread.spread_over_layers`); each layer's
update is `memit_math.alphaedit_update`: projected by P, the projector on the null space of
C = E[kkᵀ] (eigenvalues below `nullspace_threshold`, computed once per C and call), so the outputs of the
preserved keys do not move, and regularised by the keys K_p of the earlier edits.

The earlier keys are not process memory, as in the peers (a module-level cache lost on restart
and blind to undo): each commit keeps the keys it wrote (`EditResult.memory`, "keys.<layer>"), and
the repository hands back those of the commits still in effect (`Repository.memory`). They
survive restarts, and a reverted edit's keys are gone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kedit.methods import memit_math
from kedit.methods.base import EditRequest, EditResult, register_method
from kedit.methods.hparams import bounded
from kedit.methods.spread import MEMITHyperParams, StatsProvider, second_moments, spread_over_layers
from kedit.methods.tensor_cache import TensorCache

__all__ = ["AlphaEditHyperParams", "apply"]


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    """MEMIT's knobs (λ unused) plus the null-space threshold and the ridge α (`L2`)."""

    nullspace_threshold: float = bounded(2e-2, gt=0)
    L2: float = bounded(10.0, gt=0)  # α in [P(KKᵀ + K_pK_pᵀ) + αI]
    mom2_adjustment: bool = True  # the projector needs C; always on

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mom2_adjustment:
            raise ValueError("AlphaEdit projects with the statistics C; mom2_adjustment cannot be false")

    @classmethod
    def for_model(cls, model: Any) -> AlphaEditHyperParams:
        base = MEMITHyperParams.for_model(model)
        fields = {k: v for k, v in vars(base).items() if k in cls.__dataclass_fields__}
        return cls(**fields)


def projector(cache: TensorCache, name: str, c: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, dimension of the null space) for the statistics `c` of module `name`, computed once per C
    in `cache` (an eigendecomposition of a 1536-wide C takes about a second)."""
    return cache.get((name, threshold), c, lambda t: memit_math.nullspace_projector(t, threshold))


def apply(
    model: Any,
    tok: Any,
    requests: Sequence[EditRequest],
    hparams: AlphaEditHyperParams,
    *,
    stats_provider: StatsProvider | None = None,
    second_moments_by_layer: dict[int, torch.Tensor] | None = None,
    memory: Sequence[dict[str, torch.Tensor]] = (),
    projector_cache: TensorCache | None = None,
) -> EditResult:
    """AlphaEdit's deltas for the requests; `memory` holds the keys of the earlier edits in effect.

    `projector_cache`: where each C's null-space projector is kept; pass the same one to calls that
    edit with the same statistics in memory to decompose each C once (by default, once per call).
    """
    if not requests:
        raise ValueError("AlphaEdit needs at least one request")
    t0 = time.perf_counter()
    projectors = TensorCache() if projector_cache is None else projector_cache
    cs = second_moments(model, hparams, stats_provider, second_moments_by_layer)
    null_dims: dict[int, int] = {}
    prior_counts: dict[int, int] = {}

    def solve(layer: int, name: str, resid: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = cs[layer]
        assert c is not None
        p, null_dims[layer] = projector(projectors, name, c, hparams.nullspace_threshold)
        earlier = [m[f"keys.{layer}"] for m in memory if f"keys.{layer}" in m]
        prior = torch.cat(earlier, dim=1) if earlier else None
        prior_counts[layer] = 0 if prior is None else int(prior.shape[1])
        return memit_math.alphaedit_update(resid, keys, p, prior, hparams.L2)

    deltas, keys, info = spread_over_layers(model, tok, requests, hparams, solve)
    info.update(method="alphaedit", null_space_dims=null_dims, prior_keys=prior_counts,
                total_s=round(time.perf_counter() - t0, 3))
    return EditResult(deltas=dict(deltas), info=info, memory=keys)


register_method("alphaedit", AlphaEditHyperParams, apply)
