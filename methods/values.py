"""Keys and target values at a subject: ROME's v* and MEMIT's δ, and the keys both read.

The value optimisation: a vector δ added to a module's output at the
subject's last token, trained so that the model says the new target (NLL over the context
templates), keeps its distribution on "{subject} is a" (KL), with weight decay and a norm clamp.
It exists in two forms, the same algorithm with different bookkeeping, kept apart because each
is the reference for its method's stored deltas (bit for bit):

- `optimise_single_value` (ROME): one request; the bare template "{}" is encoded as the user
  sends it (`encode_with_subject(as_sent=True)`), the output head's loss comes from one fused
  pass over its weight (`forward.FusedHeadLoss`) and the whole optimisation stops at the
  early-stop loss; n steps score n − 1 updates.
- `optimise_batched_values` (MEMIT, AlphaEdit): many requests in one forward pass per step,
  δ a (requests × hidden) matrix, each prompt row adding its own request's row. The losses are
  separable (a row depends on its request's δ only) and Adam is elementwise, so each δ follows
  the same trajectory as alone, and a request that reaches the early-stop loss is frozen.

Both run layers L.. only on the positions from the subject on where the architecture allows
(`forward.SuffixForward`) and report the dtype the layers above the edit really ran in, which the
commit records as `v_dtype` (kedit/edit/run.py). For MEMIT, δ is added at the output of the MLP projection of the last
edited layer, which feeds the residual stream directly in every supported architecture: the same
as adding it to the block's output.

Keys: `template_keys` (ROME's k* before averaging, with the bare prompt as sent) and
`subject_keys` (MEMIT's K, averaged over templates), `module_outputs_at_subject` (MEMIT's h).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from kedit.methods.base import EditRequest
from kedit.methods.capture import capture_at_module
from kedit.methods.forward import FusedHeadLoss, SuffixForward, fused_head_ok, head_logits, partial_unsupported
from kedit.methods.lowp import DTYPES
from kedit.methods.prompts import encode_with_subject, input_device, pad_id, pad_right, target_ids

from kedit.model.arch import n_layers
from kedit.model.placement import execution_device, read_weight

__all__ = [
    "SingleValueFit",
    "ValueFit",
    "ValueSettings",
    "module_outputs_at_subject",
    "optimise_batched_values",
    "optimise_single_value",
    "subject_keys",
    "template_keys",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueSettings:
    """The knobs of the δ optimisation (the names of ROME's and MEMIT's hyper-parameters)."""

    v_num_grad_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: float
    kl_prompt: str = "{} is a"
    guard_position0: bool = True
    v_dtype: str = "bfloat16"  # the layers above the edited one (methods/lowp.py)


@torch.no_grad()
def _capture_at_subject(
    model: Any, tok: Any, module: Any, prompts: Sequence[tuple[str, str]], guard: bool, *, output: bool,
    batch_size: int = 64,
) -> torch.Tensor:
    """The module's input (or output) at the subject's last token of each (template, subject), float64."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        rows, positions = [], []
        for template, subject in prompts[start : start + batch_size]:
            ids, last, _ = encode_with_subject(tok, template, subject, guard)
            rows.append(ids)
            positions.append(last)
        ids, mask = pad_right(rows, pad_id(tok), input_device(model))
        x = capture_at_module(model, module, ids, mask, output=output)
        out.append(x[torch.arange(len(rows)), torch.tensor(positions)].to(torch.float64).cpu())
    return torch.cat(out)


@torch.no_grad()
def template_keys(
    model: Any, tok: Any, module: Any, templates: Sequence[str], subject: str, guard: bool,
    as_sent: Sequence[bool] = (),
) -> tuple[torch.Tensor, int]:
    """The projection's input at the subject's last token in each template (k* is their mean).

    Each template holds `{}` where the subject goes: ROME passes the context templates with the
    request's prompt written in, so the keys are read in the context the fact is asked in.

    `as_sent[i]`: template i is encoded as the user sends it (see `encode_with_subject`).

    Returns (keys (n_templates, d_in) in float64, number of prompts that needed the position-0 guard).
    """
    rows, positions, n_guarded = [], [], 0
    for i, t in enumerate(templates):
        ids, last, guarded = encode_with_subject(tok, t, subject, guard, i < len(as_sent) and as_sent[i])
        rows.append(ids)
        positions.append(last)
        n_guarded += guarded
    ids, mask = pad_right(rows, pad_id(tok), input_device(model))
    x = capture_at_module(model, module, ids, mask)  # (B, T, d_in)
    keys = x[torch.arange(len(rows)), torch.tensor(positions)]  # (B, d_in)
    return keys.to(torch.float64), n_guarded


def subject_keys(
    model: Any, tok: Any, module: Any, templates: Sequence[str], requests: Sequence[EditRequest], guard: bool
) -> torch.Tensor:
    """K: each request's key (the module's input at the subject's last token), averaged over templates.

    Returns (d_in, n) in float64, one column per request. (Fitting each template's key instead,
    weighted 1/T, the least-squares counterpart of ROME's equal-gain u, gave the same scores on 30
    SmolLM2 facts: MEMIT's failures are not ROME's bare-prompt keys.)
    """
    prompts = [(ctx.replace("{}", r.template, 1), r.subject) for r in requests for ctx in templates]
    keys = _capture_at_subject(model, tok, module, prompts, guard, output=False)
    return keys.view(len(requests), len(templates), -1).mean(1).t()


def module_outputs_at_subject(
    model: Any, tok: Any, module: Any, requests: Sequence[EditRequest], guard: bool
) -> torch.Tensor:
    """The module's output at the subject's last token of each request's own prompt, (d_out, n) float64."""
    prompts = [(r.template, r.subject) for r in requests]
    return _capture_at_subject(model, tok, module, prompts, guard, output=True).t()


@dataclass
class ValueFit:
    delta: torch.Tensor  # (n, d): one δ per request
    losses: list[list[float]] = field(default_factory=list)  # per request, per step it ran
    nll: list[list[float]] = field(default_factory=list)
    # the dtypes the layers above the edit ran in (SuffixForward's choice, or the full forward's
    # model dtype), one per chunk: they differ only where some chunks' prompts forced the full forward
    upper_dtypes: set[torch.dtype] = field(default_factory=set)


def optimise_batched_values(
    model: Any,
    tok: Any,
    module: Any,
    layer: int,
    templates: Sequence[str],
    requests: Sequence[EditRequest],
    init_norms: torch.Tensor,
    settings: ValueSettings,
    *,
    chunk: int = 32,
) -> ValueFit:
    """δ for each request, added to `module`'s output (at `layer`) at the subject's last token.

    `init_norms[i]` is the norm of the state δ_i is added to (weight decay and clamp are relative
    to it). Requests are optimised `chunk` at a time, each chunk in one batch per step.
    """
    fit = ValueFit(delta=torch.zeros(len(requests), 0))
    parts = []
    for start in range(0, len(requests), chunk):
        part = _optimise_chunk(
            model, tok, module, layer, templates, requests[start : start + chunk], init_norms[start : start + chunk],
            settings,
        )
        parts.append(part.delta)
        fit.losses += part.losses
        fit.nll += part.nll
        fit.upper_dtypes |= part.upper_dtypes
    fit.delta = torch.cat(parts)
    return fit


def _optimise_chunk(
    model: Any,
    tok: Any,
    module: Any,
    layer: int,
    templates: Sequence[str],
    requests: Sequence[EditRequest],
    init_norms: torch.Tensor,
    s: ValueSettings,
) -> ValueFit:
    n = len(requests)
    rows: list[list[int]] = []
    edit_pos: list[int] = []
    row_request: list[int] = []
    label_rows: list[int] = []
    label_cols: list[int] = []
    labels: list[int] = []
    label_weight: list[float] = []
    for i, request in enumerate(requests):
        tgt = target_ids(tok, request.target_new)
        for ctx in templates:
            ids, last, _ = encode_with_subject(tok, ctx.replace("{}", request.template, 1), request.subject,
                                               s.guard_position0)
            r = len(rows)
            rows.append(ids + tgt[:-1])
            edit_pos.append(last)
            row_request.append(i)
            for j, t in enumerate(tgt):  # token j of the target is predicted at position len(ids)-1+j
                label_rows.append(r)
                label_cols.append(len(ids) - 1 + j)
                labels.append(t)
                label_weight.append(1.0 / (len(tgt) * len(templates)))  # mean over tokens, then prompts
    kl_rows = []
    for i, request in enumerate(requests):
        ids, last, _ = encode_with_subject(tok, s.kl_prompt, request.subject, s.guard_position0)
        kl_rows.append(len(rows))
        rows.append(ids)
        edit_pos.append(last)
        row_request.append(i)

    device = input_device(model)
    n_labels = len(labels)
    label_t = torch.tensor(labels, device=device)
    label_req = torch.tensor([row_request[r] for r in label_rows], device=device)
    label_w = torch.tensor(label_weight, device=device)
    sel_rows = torch.tensor([*label_rows, *kl_rows], device=device)
    row_req = torch.tensor(row_request, device=device)

    reason = partial_unsupported(model, max(len(r) for r in rows))
    if reason is None and layer >= n_layers(model):
        reason = "layer out of range"
    if reason is None:
        runner = SuffixForward(model, rows, edit_pos, layer, pad_id(tok), DTYPES[s.v_dtype])
        sel_cols = torch.tensor(
            [c - edit_pos[r] for r, c in zip(label_rows, label_cols, strict=True)] + [0] * n, device=device
        )
        where = torch.zeros((len(rows), runner.width - runner.p_len, 1), device=device)
        where[:, 0] = 1.0  # every row's edit position is its first suffix column
        upper = runner.upper_dtype_used

        def hidden_fn() -> torch.Tensor:
            return runner.hidden()[sel_rows, sel_cols]

    else:
        ids, mask = pad_right(rows, pad_id(tok), device)
        where = torch.zeros((ids.shape[0], ids.shape[1], 1), device=device)
        where[torch.arange(ids.shape[0]), torch.tensor(edit_pos)] = 1.0
        upper = _own_dtype(model)
        sel_cols = torch.tensor([*label_cols, *[edit_pos[r] for r in kl_rows]], device=device)

        def hidden_fn() -> torch.Tensor:
            out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return out[sel_rows, sel_cols]

    d_out = _module_out_dim(module)
    delta = torch.zeros(n, d_out, device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.v_lr)
    norms = init_norms.to(device=device, dtype=torch.float32)
    max_norm = s.clamp_norm_factor * norms

    def hook(_mod: Any, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + where.to(out.dtype) * delta[row_req].to(out.dtype)[:, None, :]

    fit = ValueFit(delta=delta, losses=[[] for _ in range(n)], nll=[[] for _ in range(n)],
                   upper_dtypes={upper})
    active = torch.ones(n, dtype=torch.bool, device=device)
    kl_init: torch.Tensor | None = None
    handle = module.register_forward_hook(hook)
    try:
        for step in range(s.v_num_grad_steps):
            opt.zero_grad()
            logp = head_logits(model, hidden_fn()).log_softmax(-1)  # (n_labels + n, V)
            if kl_init is None:  # δ = 0 at step 0: the unedited distributions
                kl_init = logp[n_labels:].detach()
            tok_lp = logp[:n_labels].gather(1, label_t[:, None])[:, 0]
            nll = -torch.zeros(n, device=device).index_add(0, label_req, tok_lp * label_w)  # (n,)
            kl = F.kl_div(kl_init, logp[n_labels:], log_target=True, reduction="none").sum(-1)  # (n,)
            decay = s.v_weight_decay * delta.norm(dim=1) / norms**2
            loss = nll + s.kl_factor * kl + decay  # (n,)
            for i in torch.nonzero(active).flatten().tolist():
                fit.losses[i].append(round(float(loss[i].detach()), 5))
                fit.nll[i].append(round(float(nll[i].detach()), 5))
            active &= loss.detach() >= s.early_stop_loss
            if not bool(active.any()) or step == s.v_num_grad_steps - 1:
                break
            kept = delta.detach().clone()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                delta[~active] = kept[~active]  # converged requests stay where they stopped
                scale = (max_norm / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    finally:
        handle.remove()
    fit.delta = delta.detach().cpu()
    return fit


def _own_dtype(model: Any) -> torch.dtype:
    """The dtype the full forward runs the layers above the edit in: the model's own (no copies)."""
    return next(model.parameters()).dtype


def _module_out_dim(module: Any) -> int:
    """Width of the module's output (GPT-2's Conv1D stores its weight transposed)."""
    w = module.weight
    return int(w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0])


@dataclass
class SingleValueFit:
    delta: torch.Tensor  # (d_out,)
    upper_dtype: torch.dtype  # the layers above the edit ran in it (SuffixForward's choice, or the model's)
    losses: list[float] = field(default_factory=list)  # before each update (the δ after the last is not scored)
    nll: list[float] = field(default_factory=list)
    n_guarded: int = 0
    partial: bool = False  # whether the suffix-only forward was used


def optimise_single_value(
    model: Any,
    tok: Any,
    module: Any,
    layer: int,
    templates: Sequence[str],
    request: EditRequest,
    v_init_norm: float,
    hp: ValueSettings,
    *,
    partial: bool = True,
    fused_head: bool = True,
) -> SingleValueFit:
    """δ added to the projection's output at the subject's last token, trained for the new target.

    One batched forward pass per step over every rewrite prompt and the KL prompt. With `partial`
    (and an architecture in `PARTIAL_TYPES`), a step runs only layers L.. on the positions from
    the subject's last token on (`SuffixForward`); with `fused_head` the head's loss and gradient
    come from one pass over its weight (`FusedHeadLoss`). The loss is the same up to float rounding.
    """
    tgt = target_ids(tok, request.target_new)
    rows: list[list[int]] = []
    edit_pos: list[int] = []
    label_rows: list[int] = []
    label_cols: list[int] = []
    labels: list[int] = []
    n_guarded = 0
    for r, ctx in enumerate(templates):
        full = ctx.replace("{}", request.template, 1)
        ids, last, guarded = encode_with_subject(tok, full, request.subject, hp.guard_position0, ctx == "{}")
        n_guarded += guarded
        rows.append(ids + tgt[:-1])
        edit_pos.append(last)
        for j, t in enumerate(tgt):  # token j of the target is predicted at position len(ids)-1+j
            label_rows.append(r)
            label_cols.append(len(ids) - 1 + j)
            labels.append(t)
    kl_ids, kl_last, guarded = encode_with_subject(tok, hp.kl_prompt, request.subject, hp.guard_position0)
    n_guarded += guarded
    kl_row = len(rows)
    rows.append(kl_ids)
    edit_pos.append(kl_last)

    device = input_device(model)
    n_labels = len(labels)
    label_t = torch.tensor(labels, device=device)
    row_of_label = torch.tensor(label_rows, device=device)
    per_row = torch.bincount(row_of_label, minlength=kl_row).clamp(min=1).float()
    sel_rows = torch.tensor([*label_rows, kl_row], device=device)

    reason = partial_unsupported(model, max(len(r) for r in rows)) if partial else "disabled"
    if reason is None and layer >= n_layers(model):
        reason = "layer out of range"
    if reason is None:
        runner = SuffixForward(model, rows, edit_pos, layer, pad_id(tok), DTYPES[hp.v_dtype])
        sel_cols = torch.tensor(
            [c - edit_pos[r] for r, c in zip(label_rows, label_cols, strict=True)] + [0], device=device
        )
        where = torch.zeros((len(rows), runner.width - runner.p_len, 1), device=device)
        where[:, 0] = 1.0  # every row's edit position is its first suffix column
        upper = runner.upper_dtype_used

        def hidden_fn() -> torch.Tensor:
            return runner.hidden()[sel_rows, sel_cols]

    else:
        log.debug("ROME: full forward per step (%s)", reason)
        ids, mask = pad_right(rows, pad_id(tok), device)
        B, T = ids.shape
        where = torch.zeros((B, T, 1), device=device)  # (B, T, 1): 1 where δ is added
        where[torch.arange(B), torch.tensor(edit_pos)] = 1.0
        upper = _own_dtype(model)
        sel_cols = torch.tensor([*label_cols, kl_last], device=device)

        def hidden_fn() -> torch.Tensor:
            out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return out[sel_rows, sel_cols]

    d_out = _module_out_dim(module)
    delta = torch.zeros(d_out, device=execution_device(module), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v_init_norm

    def hook(_mod: Any, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + where.to(out.dtype) * delta.to(out.dtype)

    # NLL = mean over prompts of the mean over its target tokens: one weight per label
    label_w = (1.0 / (per_row[row_of_label] * kl_row)).float()
    fused = fused_head and fused_head_ok(model)
    head_w = read_weight(model.get_output_embeddings()) if fused else None
    result = SingleValueFit(delta=delta, upper_dtype=upper,
                            n_guarded=n_guarded, partial=reason is None)
    kl_init: torch.Tensor | None = None
    handle = module.register_forward_hook(hook)
    try:
        # v_num_grad_steps forward passes in ROME's count, the last of which only scored the final
        # δ: here n − 1 updates, each after the forward pass it needs (one pass and no update for n = 1)
        n_updates = hp.v_num_grad_steps - 1
        for _ in range(max(n_updates, 1)):
            opt.zero_grad()
            hidden = hidden_fn()  # (n_labels + 1, H)
            if kl_init is None:  # δ = 0 at step 0: the unedited distribution
                with torch.no_grad():
                    kl_init = head_logits(model, hidden[n_labels:]).log_softmax(-1)  # (1, V)
            if fused:
                nll, kl_raw = FusedHeadLoss.apply(hidden, head_w, label_t, label_w, kl_init)
            else:
                logp = head_logits(model, hidden).log_softmax(-1)  # (n_labels + 1, V)
                tok_lp = logp[:n_labels].gather(1, label_t[:, None])[:, 0]  # (n_labels,)
                nll = -(torch.zeros(kl_row, device=device).index_add(0, row_of_label, tok_lp) / per_row).mean()
                kl_raw = F.kl_div(kl_init, logp[n_labels:], log_target=True, reduction="batchmean")
            kl = hp.kl_factor * kl_raw
            decay = hp.v_weight_decay * (delta.norm() / v_init_norm**2)
            loss = nll + kl + decay
            result.losses.append(float(loss.detach()))
            result.nll.append(float(nll.detach()))
            if result.losses[-1] < hp.early_stop_loss or n_updates == 0:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    finally:
        handle.remove()
    result.delta = delta.detach()
    return result

