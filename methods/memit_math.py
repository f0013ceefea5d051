"""Closed forms of MEMIT and AlphaEdit, in float64, as factor pairs.

Both return the update of one layer as Δ = A Bᵀ with A = R (d_out × n) and B (d_in × n), so the
repository can store the factors while n(d_out + d_in) < d_out·d_in (it decides).

MEMIT: Δ = R Kᵀ (λC + KKᵀ)⁻¹, the minimiser of ‖ΔK − R‖² + λ·tr(Δ C Δᵀ): new keys K map to the
residuals R while keys distributed like C (E[kkᵀ]) move as little as possible.

AlphaEdit: Δ = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹ with P the projector on the null space of C
(its eigen-directions with eigenvalue below a threshold). Written as the solve of the original
code, Δᵀ = [P(KKᵀ + K_pK_pᵀ) + αI]⁻¹ P K Rᵀ, the solution lies in P's range, so Δ k = 0 for every
key k in the preserved subspace (ΔP = Δ), whatever R is; K_p are the keys of earlier edits.
"""

from __future__ import annotations

import torch

__all__ = ["alphaedit_update", "memit_update", "nullspace_projector"]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def memit_update(
    resid: torch.Tensor, keys: torch.Tensor, second_moment: torch.Tensor | None, lam: float, ridge: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with Δ = A Bᵀ = R Kᵀ (λC + KKᵀ)⁻¹; C = I when `second_moment` is None.

    resid: R, (d_out, n); keys: K, (d_in, n); second_moment: C, (d_in, d_in). `ridge` adds
    ridge·mean(diag C)·I to C: statistics from fewer tokens than C has dimensions leave directions
    that cost nothing, and the update would spend itself there, on every other prompt's keys too.
    """
    r, k = _f64(resid), _f64(keys)
    if r.shape[1] != k.shape[1]:
        raise ValueError(f"{r.shape[1]} residuals but {k.shape[1]} keys")
    d = k.shape[0]
    c = torch.eye(d, dtype=torch.float64) if second_moment is None else _f64(second_moment)
    if ridge > 0:
        c = c + ridge * c.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    m = lam * c + k @ k.t()  # symmetric positive definite when λ > 0 and C is
    b = torch.linalg.solve(m, k)  # (d_in, n) = M⁻¹K, so Δ = R (M⁻¹K)ᵀ = R Kᵀ M⁻¹
    return r, b


def nullspace_projector(second_moment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = ÛÛᵀ over C's eigenvectors with eigenvalue < threshold; returns (P, dimension of its range)."""
    c = _f64(second_moment)
    c = (c + c.t()) / 2
    evals, evecs = torch.linalg.eigh(c)
    small = evecs[:, evals < threshold]
    return small @ small.t(), int(small.shape[1])


def alphaedit_update(
    resid: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    prior_keys: torch.Tensor | None,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with Δ = A Bᵀ, Bᵀ = ([P(KKᵀ + K_pK_pᵀ) + αI]⁻¹ P K)ᵀ.

    resid: R, (d_out, n); keys: K, (d_in, n); projector: P, (d_in, d_in); prior_keys: K_p, (d_in, m).
    """
    r, k, p = _f64(resid), _f64(keys), _f64(projector)
    if r.shape[1] != k.shape[1]:
        raise ValueError(f"{r.shape[1]} residuals but {k.shape[1]} keys")
    s = k @ k.t()
    if prior_keys is not None and prior_keys.numel():
        kp = _f64(prior_keys)
        s = s + kp @ kp.t()
    m = p @ s + alpha * torch.eye(k.shape[0], dtype=torch.float64)
    b = torch.linalg.solve(m, p @ k)  # (d_in, n)
    return r, b
