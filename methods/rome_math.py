"""ROME's closed-form rank-one update, as pure tensor code (no model, no I/O).

Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 2:
    W' = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)
which minimises ‖W'K − WK‖ (in the metric of C = E[kkᵀ] = KKᵀ/n) subject to W'k* = v*.

One k* is used in both the left vector and the denominator (kmeng01/rome PR #44, r-ROME): the
original used the template-averaged key in u but the unprefixed key in the divisor, which made
some updates explode. Everything is computed in float64.

W here is in nn.Linear layout, (d_out, d_in); `to_stored_layout` turns the factors into the
layout the parameter is stored in (GPT-2's Conv1D keeps Wᵀ, (d_in, d_out)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RankOne",
    "equal_gain_vector",
    "factor_second_moment",
    "left_vector",
    "rank_one_update",
    "to_stored_layout",
    "toward_gain",
]


@dataclass(frozen=True)
class RankOne:
    """delta W = lam ⊗ u, in (d_out, d_in) layout."""

    lam: torch.Tensor  # (d_out,)  float64
    u: torch.Tensor  # (d_in,)  float64, unit norm
    denom: float  # u·k*, the divisor; small values signal an unstable edit

    @property
    def norm(self) -> float:
        """Frobenius norm of the update: ‖lam‖·‖u‖ = ‖lam‖."""
        return float(self.lam.norm() * self.u.norm())


def factor_second_moment(second_moment: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Cholesky factor (float64, lower) of C + ridge·mean(diag C)·I, for repeated solves with one C."""
    c = second_moment.to(torch.float64)
    d = c.shape[0]
    assert c.shape == (d, d), f"C must be square, got {tuple(c.shape)}"
    if ridge > 0:
        c = c + ridge * c.diagonal().mean() * torch.eye(d, dtype=c.dtype, device=c.device)
    return torch.linalg.cholesky(c)


def left_vector(
    k_star: torch.Tensor,
    second_moment: torch.Tensor | None,
    ridge: float = 0.0,
    *,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """u = C⁻¹k* / ‖C⁻¹k*‖ (or k*/‖k*‖ without statistics, i.e. C = I).

    ridge adds ridge·mean(diag C)·I before solving, for statistics from few samples, whose C is
    singular; 0 gives the exact solve. `factor` (from `factor_second_moment(C, ridge)`) replaces
    the O(d³) solve by two triangular solves when one C serves many edits.
    """
    assert k_star.dim() == 1, f"k* must be a vector, got shape {tuple(k_star.shape)}"
    k = k_star.to(torch.float64)
    if factor is not None:
        assert factor.shape == (k.shape[0], k.shape[0]), f"factor must be ({k.shape[0]}, {k.shape[0]})"
        u = torch.cholesky_solve(k[:, None], factor.to(device=k.device, dtype=torch.float64))[:, 0]
    elif second_moment is None:
        u = k
    else:
        d = k.shape[0]
        assert second_moment.shape == (d, d), f"C must be ({d}, {d}), got {tuple(second_moment.shape)}"
        c = second_moment.to(device=k.device, dtype=torch.float64)
        if ridge > 0:
            c = c + ridge * c.diagonal().mean() * torch.eye(d, dtype=c.dtype, device=c.device)
        u = torch.linalg.solve(c, k)  # (d_in,)
    return u / u.norm()


def equal_gain_vector(
    keys: torch.Tensor,
    second_moment: torch.Tensor | None,
    ridge: float = 0.0,
    *,
    factor: torch.Tensor | None = None,
    gram_ridge: float = 1e-3,
    gains: torch.Tensor | None = None,
) -> torch.Tensor:
    """The u of least C-norm with u·kᵢ equal for every key: u = C⁻¹Kᵀa, (K C⁻¹ Kᵀ) a = 1.

    `gains` asks for u·kᵢ ∝ gᵢ instead of 1: a 0 holds key i fixed (a neighbour to protect).

    ROME's u = C⁻¹k̄ moves each template's key kᵢ by (u·kᵢ)/(u·k̄) of the edit, and that ratio can
    be near 0 for the one prompt that matters (measured on SmolLM2: 0.01-0.06 for the bare prompt,
    the subject right after the start token, while the prefixed templates get 1.1-1.3). With this u
    the rank-one update W + (v* − Wk̄)uᵀ/(u·k̄) adds the same δ at every template's key, which is what
    ROME's value optimisation assumes. One key gives ROME's u. `gram_ridge` (relative to the
    Gram matrix's mean diagonal) keeps nearly collinear keys from blowing up a. Unit norm, float64.
    """
    k = keys.to(torch.float64)
    assert k.dim() == 2, f"keys must be (n, d_in), got shape {tuple(k.shape)}"
    n, d = k.shape
    if factor is not None:
        y = torch.cholesky_solve(k.t(), factor.to(device=k.device, dtype=torch.float64))  # (d, n) = C⁻¹Kᵀ
    elif second_moment is None:
        y = k.t()
    else:
        c = second_moment.to(device=k.device, dtype=torch.float64)
        if ridge > 0:
            c = c + ridge * c.diagonal().mean() * torch.eye(d, dtype=c.dtype, device=c.device)
        y = torch.linalg.solve(c, k.t())
    gram = k @ y  # (n, n)
    gram = gram + gram_ridge * gram.diagonal().mean() * torch.eye(n, dtype=gram.dtype, device=gram.device)
    g = torch.ones(n, dtype=k.dtype, device=k.device) if gains is None else gains.to(device=k.device, dtype=k.dtype)
    assert g.shape == (n,), f"gains must be ({n},), got {tuple(g.shape)}"
    a = torch.linalg.solve(gram, g)
    u = y @ a
    return u / u.norm()


def toward_gain(u_from: torch.Tensor, u_to: torch.Tensor, k: torch.Tensor, k_star: torch.Tensor,
                gain: float) -> torch.Tensor:
    """The point on the line from u_from to u_to (each scaled to u·k* = 1) where (u·k)/(u·k*) = gain.

    The update's norm grows along that line, so this is the least move that gives the key k the
    wanted share of the edit; if u_to cannot give it (its own gain is lower), u_to. Unit norm.
    """
    a = u_from.to(torch.float64) / float(u_from.to(torch.float64) @ k_star)
    b = u_to.to(torch.float64) / float(u_to.to(torch.float64) @ k_star)
    ga, gb = float(a @ k), float(b @ k)
    beta = 1.0 if gb <= ga else min(1.0, max(0.0, (gain - ga) / (gb - ga)))
    u = (1 - beta) * a + beta * b
    return u / u.norm()


def rank_one_update(
    w: torch.Tensor,
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> RankOne:
    """The rank-one update that makes W'k* + b = v*, with W' − W ∝ (·)uᵀ.

    w: (d_out, d_in) Linear layout; k_star: (d_in,); v_star: (d_out,) the desired output
    (including the bias, if the layer has one); u: (d_in,) from `left_vector`.
    """
    d_out, d_in = w.shape
    assert k_star.shape == (d_in,), f"k* has shape {tuple(k_star.shape)}, W expects ({d_in},)"
    assert v_star.shape == (d_out,), f"v* has shape {tuple(v_star.shape)}, W gives ({d_out},)"
    assert u.shape == (d_in,), f"u has shape {tuple(u.shape)}, expected ({d_in},)"
    w64 = w.detach().to(torch.float64)
    k = k_star.detach().to(torch.float64)
    current = w64 @ k  # (d_out,)
    if bias is not None:
        current = current + bias.detach().to(torch.float64)
    denom = float(u.to(torch.float64) @ k)
    assert denom != 0.0, "k*·u is zero: the key is orthogonal to the left vector"
    lam = (v_star.detach().to(torch.float64) - current) / denom  # (d_out,)
    return RankOne(lam=lam, u=u.to(torch.float64), denom=denom)


def to_stored_layout(update: RankOne, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a, b) with a @ b = the update in the parameter's stored layout, float32.

    Linear stores (d_out, d_in): a = lam[:, None], b = u[None, :]. Conv1D stores (d_in, d_out):
    a = u[:, None], b = lam[None, :].
    """
    lam = update.lam.to(torch.float32)
    u = update.u.to(torch.float32)
    if transposed:
        return u[:, None].contiguous(), lam[None, :].contiguous()  # (d_in, 1), (1, d_out)
    return lam[:, None].contiguous(), u[None, :].contiguous()  # (d_out, 1), (1, d_in)
