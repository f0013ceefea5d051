"""A third-party editing method, as a package outside kedit ships one: this module plus one entry
point (`kedit_tiny_plugin-0.1.dist-info/entry_points.txt`, what `pip install` writes from a
setup.cfg's `[options.entry_points] kedit.methods = tiny-logit = tiny_logit_method [batch]`).

The edit pushes the last layer's MLP output at each prompt's last token towards the target's first
token (its output-embedding row e_t): W += lr * (e_t / |e_t|) k^T / |k|^2, where k is the MLP's key
there, one rank-one term per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kedit.methods.base import EditRequest, EditResult, LowRank, register_method
from kedit.methods.capture import capture_at_module
from kedit.methods.hparams import bounded

from kedit.eval.metrics import answer_ids, prompt_ids
from kedit.model.arch import arch_for, get_module, n_layers


@dataclass
class TinyLogitHyperParams:
    lr: float = bounded(4.0, gt=0)  # how far the MLP's output moves along the target's direction

    @classmethod
    def for_model(cls, model: Any) -> TinyLogitHyperParams:
        return cls()


@torch.no_grad()
def apply(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: TinyLogitHyperParams) -> EditResult:
    if not requests:
        raise ValueError("no requests")
    arch = arch_for(model)
    layer = n_layers(model, arch) - 1
    module = get_module(model, arch.out_proj(layer))
    device = model.get_input_embeddings().weight.device
    unembed = model.get_output_embeddings().weight.float().cpu()
    values, keys = [], []
    for request in requests:
        ids = torch.tensor([prompt_ids(tok, request.text)], device=device)
        k = capture_at_module(model, module, ids, torch.ones_like(ids))[0, -1].float().cpu()
        e = unembed[answer_ids(tok, request.target_new)[0]]
        values.append(hparams.lr * e / e.norm())
        keys.append(k / k.dot(k))
    a, b = torch.stack(values, 1), torch.stack(keys)  # (out, r), (r, in)
    delta = LowRank(b.t(), a.t()) if arch.out_proj_transposed else LowRank(a, b)  # Conv1D keeps W^T
    return EditResult(deltas={arch.out_proj_weight(layer): delta}, info={"layer": layer})


register_method("tiny-logit", TinyLogitHyperParams, apply)
