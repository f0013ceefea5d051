"""MEMIT's pipeline over several layers, with the per-layer solver as an argument: what MEMIT
(methods/memit.py) and AlphaEdit (methods/alphaedit.py) share.

1. for every request a target z = h + δ for the residual stream (the output of the last edited
   block) at the subject's last token, δ optimised as ROME's v* (`values.optimise_batched_values`,
   all requests of a chunk in one batch per step);
2. for each edited layer l, ascending: the template-averaged keys K_l with the layers below
   already updated, the residual R = Z − H (H recomputed now), its share R / (layers left), and
   the solver's Δ_l (MEMIT: `memit_math.memit_update`; AlphaEdit: `memit_math.alphaedit_update`);
   Δ_l is added before the next layer's keys are read.
The model is restored on return. `MEMITHyperParams` are the knobs of this pipeline (AlphaEdit's
extend them), `second_moments` gathers C_l for every edited layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kedit.methods.base import EditRequest, LowRank
from kedit.methods.freeze import frozen
from kedit.methods.hparams import MAX_STEPS, bounded, layer_field, require_slot, validate
from kedit.methods.lowp import check_dtype, dtype_name
from kedit.methods.prompts import context_templates, encode_with_subject
from kedit.methods.values import ValueSettings, module_outputs_at_subject, optimise_batched_values, subject_keys

from kedit.eval.metrics import shows_in_generation
from kedit.model.arch import arch_for, get_module, n_layers
from kedit.model.placement import add_to_weight, weight_restored

__all__ = [
    "LayerSolver",
    "MEMITHyperParams",
    "StatsProvider",
    "default_layers",
    "second_moments",
    "spread_over_layers",
]

StatsProvider = Callable[[str, int], torch.Tensor]
# (layer, module name, residual share R_l (d_out, n), keys K_l (d_in, n)) -> (A, B) with Δ = A Bᵀ
LayerSolver = Callable[[int, str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# λ is relative to C = E[kkᵀ]: kᵀ(λC)⁻¹k grows with the key width d, so the peers' λ = 15000 for
# GPT-J (d = 16384) is scaled by d/16384 here (1406 for SmolLM2's 1536-wide keys).
_LAMBDA_PER_KEY_DIM = 15000 / 16384


def default_layers(model: Any) -> tuple[int, ...]:
    """Five consecutive layers ending two above ROME's layer (llama-7b: ROME 5, MEMIT 4..8)."""
    arch = arch_for(model)
    total = n_layers(model, arch)
    centre = arch.default_layer(total)
    last = max(0, min(centre + 2, total - 2))  # the target must have a layer above it to act through
    return tuple(range(max(0, last - 4), last + 1))


@dataclass
class MEMITHyperParams:
    """MEMIT's knobs; `for_model` fills the layers, module names and λ from kedit.model.arch."""

    layers: tuple[int, ...] = layer_field()
    rewrite_module_tmp: str  # the MLP output projection, "{}" = layer
    layer_module_tmp: str  # the block whose output is the residual stream, "{}" = layer
    out_proj_transposed: bool = False
    mom2_update_weight: float = bounded(15000.0, gt=0)  # λ
    mom2_adjustment: bool = True  # false: C = I
    mom2_n_samples: int = bounded(256, ge=1, le=10_000_000)
    mom2_ridge: float = bounded(1e-2, ge=0)  # C + ridge·mean(diag C)·I: few-sample statistics are singular
    # EasyEdit's llama files: 25 steps at lr 0.5; on SmolLM2 ROME reached the same scores with 12
    # steps at lr 1.0 in half the time (methods/rome.py), and MEMIT's δ is ROME's v* at the residual.
    v_num_grad_steps: int = bounded(12, ge=1, le=MAX_STEPS)
    v_lr: float = bounded(1.0, gt=0)
    v_weight_decay: float = bounded(1e-3, ge=0)
    clamp_norm_factor: float = bounded(4.0, gt=0)  # δ's norm at most this times the residual stream's
    kl_factor: float = bounded(0.0625, ge=0)
    early_stop_loss: float = bounded(5e-2, ge=0)
    kl_prompt: str = "{} is a"
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 5),)
    context_template_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    guard_position0: bool = True
    # requests per batch of the δ optimisation; 1 is the peers' one-at-a-time
    v_batch_size: int = bounded(32, ge=1, le=MAX_STEPS)
    v_dtype: str = "bfloat16"  # the layers above the last edited one while δ is optimised (methods/lowp.py)
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        validate(self)
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be distinct, ascending and >= 0, got {list(self.layers)}")
        require_slot(self, "rewrite_module_tmp", "layer")
        require_slot(self, "layer_module_tmp", "layer")
        self.context_template_length_params = tuple(tuple(p) for p in self.context_template_length_params)  # type: ignore[assignment]
        check_dtype(self.v_dtype)
        require_slot(self, "kl_prompt", "subject")

    @classmethod
    def for_model(cls, model: Any) -> MEMITHyperParams:
        arch = arch_for(model)
        d_in = _key_width(model, arch.out_proj_tmp.format(0), arch.out_proj_transposed)
        return cls(
            layers=default_layers(model),
            rewrite_module_tmp=arch.out_proj_tmp,
            layer_module_tmp=arch.layer_tmp,
            out_proj_transposed=arch.out_proj_transposed,
            mom2_update_weight=round(_LAMBDA_PER_KEY_DIM * d_in, 1),
            v_weight_decay=0.5 if arch.model_type == "gpt2" else 1e-3,
        )

    def module_name(self, layer: int) -> str:
        return self.rewrite_module_tmp.format(layer)

    def value_settings(self) -> ValueSettings:
        return ValueSettings(self.v_num_grad_steps, self.v_lr, self.v_weight_decay, self.clamp_norm_factor,
                             self.kl_factor, self.early_stop_loss, self.kl_prompt, self.guard_position0, self.v_dtype)


def _key_width(model: Any, module_name: str, transposed: bool) -> int:
    w = get_module(model, module_name).weight
    return int(w.shape[0] if transposed else w.shape[1])


def spread_over_layers(
    model: Any, tok: Any, requests: Sequence[EditRequest], hp: Any, solve: LayerSolver
) -> tuple[dict[str, LowRank], dict[str, torch.Tensor], dict[str, Any]]:
    """MEMIT's targets, keys and residual spreading with a given per-layer solver.

    `hp` needs MEMITHyperParams' fields. Returns (deltas by parameter name, the keys K_l written at
    each layer as "keys.<layer>", diagnostics). The model is unchanged on return.
    """
    total = n_layers(model)
    if hp.layers[-1] >= total - 1:
        raise ValueError(f"layers={list(hp.layers)} but the model has {total} layers: the last edited layer "
                         f"must be below the top one ({total - 1}), whose change cannot reach the next token")
    for r in requests:
        encode_with_subject(tok, r.template, r.subject, hp.guard_position0)  # bad requests fail early
    timings: dict[str, float] = {}
    modules = {layer: get_module(model, hp.module_name(layer)) for layer in hp.layers}
    last = hp.layers[-1]
    block = get_module(model, hp.layer_module_tmp.format(last))
    deltas: dict[str, LowRank] = {}
    written: dict[str, torch.Tensor] = {}
    layer_info = []
    with weight_restored(list(modules.values())), frozen(model, eval_mode=True):
        t0 = time.perf_counter()
        templates = context_templates(model, tok, hp)
        h0 = module_outputs_at_subject(model, tok, block, requests, hp.guard_position0)  # (d, n)
        fit = optimise_batched_values(model, tok, modules[last], last, templates, requests, h0.norm(dim=0),
                                      hp.value_settings(), chunk=hp.v_batch_size)
        z = h0 + fit.delta.t().to(torch.float64)
        timings["values_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, layer in enumerate(hp.layers):
            name = hp.module_name(layer)
            keys = subject_keys(model, tok, modules[layer], templates, requests, hp.guard_position0)
            h = module_outputs_at_subject(model, tok, block, requests, hp.guard_position0)
            resid = (z - h) / (len(hp.layers) - i)
            a, b = solve(layer, name, resid, keys)
            if hp.out_proj_transposed:  # Conv1D stores Wᵀ: Δᵀ = B Aᵀ
                delta = LowRank(b.float().contiguous(), a.t().float().contiguous())
            else:
                delta = LowRank(a.float().contiguous(), b.t().float().contiguous())
            add_to_weight(modules[layer], delta.a @ delta.b)
            deltas[name + ".weight"] = delta
            written[f"keys.{layer}"] = keys.float().contiguous()
            layer_info.append({
                "layer": layer,
                "residual_norm": float((z - h).norm(dim=0).mean()),
                "update_norm": float((a @ b.t()).norm()),
            })
        timings["layers_s"] = time.perf_counter() - t0
        with torch.no_grad():
            h_end = module_outputs_at_subject(model, tok, block, requests, hp.guard_position0)
        reached = 1 - (z - h_end).norm(dim=0) / (z - h0).norm(dim=0).clamp(min=1e-12)
        # the model holds every layer's Δ here: does each prompt, as the user sends it, generate its target?
        shows = shows_in_generation(model, tok, [r.text for r in requests], [r.target_new for r in requests])
    info = {
        "layers": list(hp.layers),
        "per_layer": layer_info,
        "requests": [
            {"subject": r.subject, "target_new": r.target_new, "steps": len(fit.losses[i]),
             "loss": fit.losses[i][-1] if fit.losses[i] else None, "delta_norm": float(fit.delta[i].norm()),
             "target_reached": round(float(reached[i]), 4), "shows_in_generation": shows[i]}
            for i, r in enumerate(requests)
        ],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "v_dtype_used": sorted(dtype_name(d) for d in fit.upper_dtypes),  # kedit/edit/run.py records it
    }
    return deltas, written, info


def second_moments(
    model: Any, hp: Any, stats_provider: StatsProvider | None, given: dict[int, torch.Tensor] | None
) -> dict[int, torch.Tensor | None]:
    """C_l for every edited layer (None everywhere when mom2_adjustment is off)."""
    if not hp.mom2_adjustment:
        return {layer: None for layer in hp.layers}
    out: dict[int, torch.Tensor | None] = {}
    for layer in hp.layers:
        c = (given or {}).get(layer)
        if c is None and stats_provider is not None:
            c = stats_provider(hp.module_name(layer), layer)
        if c is None:
            raise ValueError(
                f"this method needs the second moment E[kkᵀ] of the input of {hp.module_name(layer)}: pass "
                "stats_provider= or second_moments= (kedit stats computes and caches it), or set mom2_adjustment=false"
            )
        out[layer] = c
    return out
