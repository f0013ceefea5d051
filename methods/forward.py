"""Forward passes for optimising a value: the output head and a partial (suffix-only) forward.

ROME's v*, MEMIT's δ and GRACE's codebook values are trained through the model many times on the
same prompts, with the change entering at one layer. Two shortcuts give the full forward's loss
trajectory up to float rounding (tests/methods/test_rome.py checks both):

- `SuffixForward`: only layers L.. and only the positions from the edit position on run at each
  step, from a no-grad pass that caches the rest (for the architectures in `PARTIAL_TYPES`;
  `partial_unsupported` says why another model must run the full forward);
- `FusedHeadLoss`: the output head's NLL and KL and their gradient in one pass over its weight.

`head_logits` applies the head (with Gemma-2's soft cap) where only some positions are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from kedit.methods.lowp import has_hooks, low_precision
from kedit.methods.prompts import input_device

from kedit.model.arch import arch_for, cache_keyword, get_module, n_layers
from kedit.model.placement import execution_device

__all__ = [
    "PARTIAL_TYPES",
    "FusedHeadLoss",
    "SuffixForward",
    "fused_head_ok",
    "head_logits",
    "logits_at",
    "partial_unsupported",
]


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The output head (with Gemma-2's soft cap) on final hidden states, in float32."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def logits_at(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits at the given (row, position) pairs only: the head is applied where the loss needs it."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    return head_logits(model, hidden[rows, cols])  # (N, V)


class FusedHeadLoss(torch.autograd.Function):
    """ROME's NLL and KL terms and their gradient in ONE pass over the output head's weight.

    At this scale a step reads every weight it uses from memory; the head (vocabulary × hidden)
    is the largest, and autograd reads it twice (logits, then their gradient). Here each chunk of
    vocabulary rows is used for both while it is in cache, with running (max-rescaled) sums:
    s0 = Σ e^z, S1 = Σ e^z w_v and, for the KL row, a = Σ e^z (z − log p0), A1 = Σ e^z (z − log p0) w_v.
    Then log Z = m + log s0; −log p_y = log Z − z_y with gradient S1/s0 − w_y; KL(q‖p0) = a/s0 − log Z
    with gradient A1/s0 − (log Z + KL)·S1/s0. Same values as log_softmax + gather + kl_div.
    """

    CHUNK = 2048

    @staticmethod
    def forward(ctx, hidden, weight, labels, label_weights, kl_init):  # type: ignore[override]
        # hidden (N + 1, H): the label rows then the KL row; labels (N,); label_weights (N,) sum to 1
        h = hidden.detach().float()
        n, d = h.shape
        m = torch.full((n, 1), float("-inf"))
        s0 = torch.zeros(n, 1)
        s1 = torch.zeros(n, d)
        a = torch.zeros(1, 1)
        a1 = torch.zeros(1, d)
        for start in range(0, weight.shape[0], FusedHeadLoss.CHUNK):
            w = weight[start : start + FusedHeadLoss.CHUNK].float()  # (C, H)
            z = h @ w.t()  # (n, C)
            m_new = torch.maximum(m, z.max(1, keepdim=True).values)
            scale = (m - m_new).exp()
            e = (z - m_new).exp()  # (n, C)
            s0 = s0 * scale + e.sum(1, keepdim=True)
            ek = e[-1:] * (z[-1:] - kl_init[:, start : start + w.shape[0]])  # (1, C)
            a = a * scale[-1:] + ek.sum(1, keepdim=True)
            s1 = s1 * scale + e @ w
            a1 = a1 * scale[-1:] + ek @ w
            m = m_new
        log_z = m + s0.log()  # (n, 1)
        z_y = (h[:-1] * weight[labels].float()).sum(1)  # (N,)
        nll_tok = log_z[:-1, 0] - z_y
        kl = a[0, 0] / s0[-1, 0] - log_z[-1, 0]
        grad_nll = (s1[:-1] / s0[:-1] - weight[labels].float()) * label_weights[:, None]  # (N, H)
        grad_kl = a1 / s0[-1:] - (log_z[-1:] + kl) * s1[-1:] / s0[-1:]  # (1, H)
        ctx.save_for_backward(grad_nll, grad_kl)
        ctx.hidden_dtype = hidden.dtype
        return (nll_tok * label_weights).sum(), kl

    @staticmethod
    def backward(ctx, g_nll, g_kl):  # type: ignore[override]
        grad_nll, grad_kl = ctx.saved_tensors
        grad = torch.cat([grad_nll * g_nll, grad_kl * g_kl]).to(ctx.hidden_dtype)
        return grad, None, None, None, None


def fused_head_ok(model: Any) -> bool:
    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
        and execution_device(head).type == "cpu"
    )


# Architectures whose decoder layers can be run one by one from kedit (same call as their model's
# forward: 4D mask, position ids, rotary position embeddings, a cache with `update`). Each is checked
# against the full forward in tests/methods/test_rome.py; any other architecture uses the full forward.
PARTIAL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox"})


class _PrefixKV:
    """A read-only cache: layer i's keys/values of the prefix columns, joined to the new ones."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.kv = kv

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_a: Any, **_k: Any):
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk, keys], dim=-2), torch.cat([pv, values], dim=-2)


def partial_unsupported(model: Any, width: int) -> str | None:
    """Why the suffix-only forward cannot be used for this model (None: it can)."""
    config = model.config
    if getattr(config, "model_type", None) not in PARTIAL_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r} is not checked for the partial forward"
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and width > window:
        return "prompts longer than the sliding window"
    if getattr(model.base_model, "rotary_emb", None) is None:
        return "no model-level rotary embedding"
    return None


class SuffixForward:
    """Layers L.. of the model over the columns from the subject's last token on.

    δ enters at the subject's last token of layer L, so every hidden state below layer L and every
    position before that token is the same at each step (causal attention). Rows are laid out as
    [prefix, pad..., suffix, pad...] so that every row's edit position is column P; one no-grad
    pass stores the input of layer L at the suffix columns and the keys/values of the prefix
    columns at layers L.., and each step runs layers L.. on the S suffix columns only.

    With `upper_dtype`, the layers above L and the final norm run as frozen copies in that dtype
    (`lowp.low_precision`); layer L, where δ enters, and the returned states keep the model's.
    If any of them carries hooks (an installed GRACE codebook, accelerate's placement), all run as
    they are. `upper_dtype_used` says which was done, for the commit to record.
    """

    upper_dtype_used: torch.dtype

    def __init__(self, model: Any, rows: Sequence[Sequence[int]], edit_pos: Sequence[int], layer: int, pad: int,
                 upper_dtype: torch.dtype | None = None):
        arch = arch_for(model)
        self.model = model
        self.layer = layer
        total = n_layers(model, arch)
        self.layers = [get_module(model, arch.layer_tmp.format(i)) for i in range(total)]
        self.final_norm = get_module(model, arch.final_norm)
        self.cache_kw = cache_keyword(self.layers[0].forward)
        device = input_device(model)
        p_len = max(edit_pos)
        s_len = max(len(r) - e for r, e in zip(rows, edit_pos, strict=True))
        width = p_len + s_len
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row, e) in enumerate(zip(rows, edit_pos, strict=True)):
            row_t = torch.tensor(list(row), dtype=torch.long)
            n_suffix = len(row) - e
            ids[r, :e], keep[r, :e], pos[r, :e] = row_t[:e], True, torch.arange(e)
            ids[r, p_len : p_len + n_suffix] = row_t[e:]
            keep[r, p_len : p_len + n_suffix] = True
            pos[r, p_len : p_len + n_suffix] = torch.arange(e, len(row))
        col = torch.arange(width)
        # causal by column, real keys only; each column also sees itself, so no row of a pad query is empty
        allowed = ((col[None, :] <= col[:, None])[None] & keep[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        dtype = self.final_norm.weight.dtype if hasattr(self.final_norm, "weight") else torch.float32

        def additive_mask(dt: torch.dtype) -> torch.Tensor:  # (B, 1, P + S, P + S)
            return torch.zeros(allowed.shape, dtype=dt).masked_fill_(~allowed, torch.finfo(dt).min)[:, None].to(device)

        mask = additive_mask(dtype)
        ids, pos = ids.to(device), pos.to(device)
        self.p_len, self.width = p_len, width
        self.pos = pos[:, p_len:]
        self.mask = mask[:, :, p_len:, :]  # (B, 1, S, P + S)

        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        captured: list[torch.Tensor] = []

        def grab(_mod: Any, args: tuple, kwargs: dict) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = self.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                 **{cache_keyword(model.base_model.forward): cache})
        finally:
            handle.remove()
        self.h_in = captured[0][:, p_len:]  # (B, S, H): input of layer L at the suffix columns
        self.prefix_kv = {
            i: (cache.layers[i].keys[:, :, :p_len].detach(), cache.layers[i].values[:, :, :p_len].detach())
            for i in range(layer, total)
        }
        with torch.no_grad():
            self.position_embeddings = model.base_model.rotary_emb(self.h_in, self.pos)
        # the layers above L: (layers, final norm, prefix keys/values, mask, rotary embeddings)
        upper = self.layers[layer + 1 :]
        if upper_dtype is None or upper_dtype == dtype or any(has_hooks(m) for m in (*upper, self.final_norm)):
            self.upper = (upper, self.final_norm, self.prefix_kv, self.mask, self.position_embeddings)
            self.upper_dtype_used = dtype
        else:
            self.upper = (
                [low_precision(m, upper_dtype) for m in upper],
                low_precision(self.final_norm, upper_dtype),
                {i: (k.to(upper_dtype), v.to(upper_dtype)) for i, (k, v) in self.prefix_kv.items()},
                additive_mask(upper_dtype)[:, :, p_len:, :],
                tuple(x.to(upper_dtype) for x in self.position_embeddings),
            )
            self.upper_dtype_used = upper_dtype

    def _run(self, layer: Any, h: torch.Tensor, kv: dict, mask: torch.Tensor, rotary: tuple) -> torch.Tensor:
        out = layer(h, attention_mask=mask, position_ids=self.pos, position_embeddings=rotary, use_cache=True,
                    **{self.cache_kw: _PrefixKV(kv)})
        return out[0] if isinstance(out, tuple) else out

    def hidden(self) -> torch.Tensor:
        """Final hidden states (after the last norm) at the suffix columns, (B, S, H)."""
        h = self._run(self.layers[self.layer], self.h_in, self.prefix_kv, self.mask, self.position_embeddings)
        layers, norm, kv, mask, rotary = self.upper
        h = h.to(mask.dtype)
        for layer in layers:
            h = self._run(layer, h, kv, mask, rotary)
        return norm(h).to(self.h_in.dtype)

