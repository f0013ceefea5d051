"""FT-L: fine-tuning of one layer's MLP with a norm constraint, the baseline every table compares.

As in the ROME paper's FT+L: Adam on the target's negative log-likelihood after each request's
prompt, only the chosen weights trainable, and after every step each weight is clamped to within
±`norm_constraint` of its original value (an L∞ ball). The delta is dense: fine-tuning has no
low-rank structure to store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kedit.methods.base import Dense, EditRequest, EditResult, register_method
from kedit.methods.hparams import MAX_STEPS, bounded, layer_field, require_slot, validate

from kedit.eval.metrics import answer_ids, prompt_ids
from kedit.model.arch import arch_for, get_module, n_layers
from kedit.model.placement import is_offloaded

__all__ = ["FTHyperParams", "apply"]


@dataclass
class FTHyperParams:
    layers: tuple[int, ...] = layer_field()
    rewrite_module_tmp: str  # the MLP output projection, "{}" = layer
    lr: float = bounded(5e-4, gt=0)
    num_steps: int = bounded(25, ge=1, le=MAX_STEPS)
    norm_constraint: float = bounded(5e-4, ge=0)  # L∞ radius around the original weights; 0 = unconstrained
    batch_size: int = bounded(64, ge=1, le=MAX_STEPS)  # requests per optimiser step
    early_stop_loss: float = bounded(1e-2, ge=0)

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        validate(self)
        if not self.layers:
            raise ValueError("layers must not be empty")
        require_slot(self, "rewrite_module_tmp", "layer")

    @classmethod
    def for_model(cls, model: Any) -> FTHyperParams:
        arch = arch_for(model)
        return cls(layers=(arch.default_layer(n_layers(model, arch)),), rewrite_module_tmp=arch.out_proj_tmp)


def _batch(tok: Any, requests: Sequence[EditRequest], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + target rows, with the target positions marked for the loss."""
    rows, spans = [], []
    for r in requests:
        p, a = prompt_ids(tok, r.text), answer_ids(tok, r.target_new)
        rows.append(p + a)
        spans.append((len(p), len(a)))
    width = max(len(x) for x in rows)
    pad = next(int(t) for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, (n_p, n_a)) in enumerate(zip(rows, spans, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, n_p - 1 : n_p - 1 + n_a] = torch.tensor(row[n_p:])  # position t predicts token t+1
    return ids.to(device), mask.to(device), labels.to(device)


def apply(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: FTHyperParams) -> EditResult:
    """Fine-tuned weights of the chosen layers as dense deltas; the model is left unchanged."""
    if not requests:
        raise ValueError("FT needs at least one request")
    total = n_layers(model)
    if max(hparams.layers) >= total:
        raise ValueError(f"layers={list(hparams.layers)} but the model has {total} layers (0..{total - 1})")
    t0 = time.perf_counter()
    modules = {hparams.rewrite_module_tmp.format(layer): get_module(model, hparams.rewrite_module_tmp.format(layer))
               for layer in hparams.layers}
    offloaded = [name for name, module in modules.items() if is_offloaded(module)]
    if offloaded:  # its optimiser steps the parameters themselves, which are meta tensors there
        raise ValueError(f"FT trains weights in place and cannot train layers offloaded to disk ({offloaded[0]}): "
                         "give --max-memory room for them, or edit with rome, memit or alphaedit")
    params = {name + ".weight": module.weight for name, module in modules.items()}
    originals = {n: p.detach().clone() for n, p in params.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    device = next(iter(params.values())).device
    losses: list[float] = []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(list(params.values()), lr=hparams.lr)
        batches = [_batch(tok, requests[i : i + hparams.batch_size], device)
                   for i in range(0, len(requests), hparams.batch_size)]
        for _ in range(hparams.num_steps):
            total_loss = 0.0
            for ids, mask, labels in batches:
                opt.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(ids)
                if hparams.norm_constraint > 0:
                    with torch.no_grad():
                        for n, p in params.items():
                            eps = hparams.norm_constraint
                            p.copy_(torch.clamp(p, originals[n] - eps, originals[n] + eps))
            losses.append(round(total_loss / len(requests), 5))
            if losses[-1] < hparams.early_stop_loss:
                break
        deltas = {n: Dense((p.detach() - originals[n]).contiguous()) for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
    info = {
        "method": "ft",
        "layers": list(hparams.layers),
        "loss": losses,
        "steps": len(losses),
        "delta_max_abs": {n: float(d.delta.abs().max()) for n, d in deltas.items()},
        "total_s": round(time.perf_counter() - t0, 3),
    }
    return EditResult(deltas=dict(deltas), info=info)


register_method("ft", FTHyperParams, apply)
