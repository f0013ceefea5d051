"""ROME: Rank-One Model Editing (Meng et al. 2022), one fact per request, faithful to the paper.

Steps (methods.md 3.2):
1. context templates: short prefixes the model writes itself, plus the bare "{}";
2. k*: the input of the MLP output projection at the subject's last token, averaged over templates;
3. v*: the projection's output there plus a vector δ optimised so that the model says the new
   target (NLL), keeps its distribution on "{subject} is a" (KL), with weight decay and a norm clamp;
4. the closed form of `rome_math` with u = C⁻¹k* and the same k* in the divisor.

The model is never changed: δ enters through a forward hook, requests after the first are
computed with the earlier updates added temporarily and the original weight is put back. The
result is one `LowRank` delta (rank = number of requests) in the parameter's stored layout.

Speed (CPU, small models): a step of the v* optimisation runs only layers L.. and only the
positions from the subject's last token on, from a no-grad pass that caches the rest
(`SuffixForward`, for the architectures in `PARTIAL_TYPES`; others run the full forward), and
the output head's loss and gradient come from one pass over its weight (`_FusedHeadLoss`).
Both give the full forward's loss trajectory up to float rounding (tests/methods/test_rome.py).
C's Cholesky factor is kept across edits (`_factor`).

Position-0 hazard: a tokenizer that adds no BOS (SmolLM2) puts a one-token subject at position 0
of the bare template, the attention-sink position, whose key is unlike any other; keys read
there gave divisors near zero and updates ten times too large. The context templates are read
after a document separator (`kedit.evaluate.start_token_id`); the bare prompt "{}" is read as the
user sends it (`tokenizer(prompt)`), so the key a user's query meets is one of those k* averages,
and only where its subject's last token would sit at the sink does it get the separator too
(`info["position0_guarded"]` counts those prompts).

Each edit is checked where it will be used: the edited model, given the prompt as sent, must
generate the target within kedit.evaluate's greedy continuation (`shows_in_generation`); if not,
the gain floor is raised, then v* optimised again (see `_edit_one`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from kedit.methods import rome_math
from kedit.methods.base import EditRequest, EditResult, LowRank, register_method
from kedit.methods.capture import capture_at_module
from kedit.methods.hparams import MAX_STEPS, bounded, layer_field, validate
from kedit.methods.lowp import DTYPES, check_dtype, has_hooks, low_precision

from kedit.eval.metrics import answer_ids, prompt_ids, shows_in_generation, start_token_id
from kedit.model.arch import arch_for, cache_keyword, get_module, n_layers

__all__ = [
    "ROMEHyperParams",
    "StatsProvider",
    "apply",
    "context_templates",
    "second_moment_needed",
    "subject_key",
]

log = logging.getLogger(__name__)

StatsProvider = Callable[[str, int], torch.Tensor]  # (module name, layer) -> E[k kᵀ], (d_in, d_in)


@dataclass
class ROMEHyperParams:
    """ROME's knobs; `for_model` fills the layer and module names from kedit.arch."""

    layer: int = layer_field()
    rewrite_module_tmp: str  # the MLP output projection, "{}" = layer
    out_proj_transposed: bool = False  # GPT-2 Conv1D stores Wᵀ
    # EasyEdit's llama files: 25 steps at lr 0.5. On SmolLM2-135M the KL term keeps the loss above
    # ROME's 5e-2 early stop, so all 25 steps ran; 12 steps at lr 1.0 gave the same efficacy,
    # paraphrase and neighbourhood scores on 12 CounterFact edits at half the time (bench/results/rome_counterfact.md).
    v_num_grad_steps: int = bounded(12, ge=1, le=MAX_STEPS)
    v_lr: float = bounded(1.0, gt=0)
    v_weight_decay: float = bounded(1e-3, ge=0)
    clamp_norm_factor: float = bounded(4.0, gt=0)
    kl_factor: float = bounded(0.0625, ge=0)
    early_stop_loss: float = bounded(5e-2, ge=0)
    mom2_adjustment: bool = True  # u = C⁻¹k*; false means C = I (EasyEdit's default)
    # texts behind C (bench/stats_samples.py: 16 are within a point of 256)
    mom2_n_samples: int = bounded(256, ge=1, le=10_000_000)
    mom2_ridge: float = bounded(1e-6, ge=0)  # C + ridge·mean(diag C)·I, so few-sample statistics stay invertible
    # (tokens, count) of generated prefixes. ROME's [[5,10],[10,10]] (21 templates) costs 4x the
    # time per step; bench/rome_counterfact.py compares the two on SmolLM2.
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 5),)
    context_template_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    kl_prompt: str = "{} is a"
    guard_position0: bool = True
    # ROME's u = C⁻¹k* gives the prompt as asked (u·k)/(u·k*) of the edit (`prompt_gain`), near 0
    # for a few subjects. Below this floor, u moves toward the one with equal u·k at every
    # template's key (rome_math.equal_gain_vector) just far enough to give the prompt this much:
    # the edit shows, with a larger update. 0: ROME's u always; >= 1: the whole equal-gain u.
    prompt_gain_floor: float = bounded(0.0, ge=0)
    # When the edited model does not give the target on the prompt as asked (not every target
    # token the argmax, nor the new target likelier than the true one), the floor is raised to
    # these in turn until it does. A raised floor costs update norm and neighbours, so only the
    # edits that need it pay (bench/results/rome_counterfact_100.md). (): checked, never raised.
    escalate_gain_floors: tuple[float, ...] = bounded((0.5, 0.7, 1.0), gt=0)
    # Keys of the request's neighbourhood and locality prompts (every token after the start) that
    # ROME's u would give more than this share of the edit are held fixed (u·k = 0, least C-norm):
    # subjects that share the edited key ("Mawson Glacier", "Howard Glacier") then keep their
    # answers (on SmolLM2, 100 edits scored on neighbours they never saw: 5 collapsed
    # neighbourhoods without, 2 with). Only prompts given with the edit count. 0: off (ROME).
    protect_overlap: float = bounded(0.3, ge=0)
    # An edit that still does not show is usually a v* that did not converge in v_num_grad_steps
    # (on SmolLM2: "Newton Moore worked in" -> Amsterdam, NLL 0.68 after 12 steps, 0.02 after 24);
    # v* is optimised again with this many steps, then the floors again. <= v_num_grad_steps: never.
    retry_grad_steps: int = bounded(24, ge=0, le=MAX_STEPS)
    # The layers above the edited one run in this dtype while v* is optimised (methods/lowp.py):
    # half the memory traffic of a step. "float32" runs them as loaded.
    v_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        self.escalate_gain_floors = tuple(float(g) for g in self.escalate_gain_floors)
        validate(self)
        if "{}" not in self.rewrite_module_tmp:
            raise ValueError(f"rewrite_module_tmp must contain '{{}}' for the layer, got {self.rewrite_module_tmp!r}")
        check_dtype(self.v_dtype)
        self.context_template_length_params = tuple(tuple(p) for p in self.context_template_length_params)  # type: ignore[assignment]
        for p in self.context_template_length_params:
            if len(p) != 2 or p[0] < 1 or p[1] < 0:
                raise ValueError(f"context_template_length_params entries are [tokens >= 1, count >= 0], got {list(p)}")
        if any(p[1] > 0 for p in self.context_template_length_params) and not self.context_template_seeds:
            raise ValueError("context_template_seeds must not be empty when templates are generated")
        if "{}" not in self.kl_prompt:
            raise ValueError(f"kl_prompt must contain '{{}}' for the subject, got {self.kl_prompt!r}")

    @classmethod
    def for_model(cls, model: Any) -> ROMEHyperParams:
        """Defaults for this model's architecture (layer, module names, weight decay)."""
        arch = arch_for(model)
        return cls(
            layer=arch.default_layer(n_layers(model, arch)),
            rewrite_module_tmp=arch.out_proj_tmp,
            out_proj_transposed=arch.out_proj_transposed,
            v_weight_decay=0.5 if arch.model_type == "gpt2" else 1e-3,  # EasyEdit gpt2-xl / llama files
        )

    @property
    def module_name(self) -> str:
        return self.rewrite_module_tmp.format(self.layer)


def second_moment_needed(hparams: ROMEHyperParams) -> tuple[str, int] | None:
    """(module name, layer) whose input statistics `apply` needs, or None when C = I."""
    return (hparams.module_name, hparams.layer) if hparams.mom2_adjustment else None


# ---------------------------------------------------------------------------------------------
# tokenisation


def input_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def pad_id(tok: Any) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# Targets are tokenised exactly as the metrics read them, so an edit optimises what is scored.
target_ids = answer_ids


def encode_with_subject(tok: Any, template: str, subject: str, guard: bool,
                        as_sent: bool = False) -> tuple[list[int], int, bool]:
    """Ids of template with the subject, the index of the subject's last token, and whether guarded.

    `guard`: a start token goes in front (away from the attention sink). `as_sent`: the text is
    encoded as the user sends it (`tokenizer(text)`), the start token only where the subject's last
    token would otherwise sit at position 0, the sink, whose key no edit can use."""
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    end = start + len(subject)  # subject occupies chars [start, end)
    try:
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        last = max(i for i, (s, e) in enumerate(offsets) if e > s and s < end)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: no offsets
        ids = list(tok(text)["input_ids"])
        last = len(tok(text[:end])["input_ids"]) - 1
    guarded = guard and last == 0
    start = start_token_id(tok) if guard and (guarded or not as_sent) else None
    if start is not None:
        ids, last = [start, *ids], last + 1
    elif guarded:
        raise ValueError("the tokenizer has no BOS or EOS token to guard position 0; set guard_position0=false")
    return ids, last, guarded


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------
# context templates, cached per model object (not per process)

_TEMPLATE_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, list[str]]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _generate(model: Any, tok: Any, seeds: Sequence[str], n_tokens: int, seed: int) -> list[str]:
    """Sampled continuations of the seeds (top-k 5 as in ROME), left-padded with an attention mask."""
    # Without BOS a lone seed word sits at the attention sink and the model writes junk
    # ("The-the-world-is"); a separator token in front gives ordinary prose.
    start = start_token_id(tok)
    encoded = [([] if start is None else [start]) + list(tok(s)["input_ids"]) for s in seeds]
    width = max(len(e) for e in encoded)
    pad = pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(input_device(model)),
            attention_mask=mask.to(input_device(model)),
            do_sample=True,
            top_k=5,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            pad_token_id=pad,
        )
    return [tok.decode(row, skip_special_tokens=True) for row in out[:, width:]]


def context_templates(model: Any, tok: Any, hparams: ROMEHyperParams) -> list[str]:
    """["{}", "<generated>. {}", ...]: the model's own prefixes, generated once per model and settings."""
    key = (
        getattr(tok, "name_or_path", ""),
        len(tok),
        hparams.context_template_length_params,
        hparams.context_template_seeds,
        hparams.seed,
    )
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    if key not in per_model:
        templates = ["{}"]
        seeds = list(hparams.context_template_seeds)
        for i, (n_tokens, count) in enumerate(hparams.context_template_length_params):
            if count == 0:
                continue
            prompts = [seeds[j % len(seeds)] for j in range(count)]
            texts = _generate(model, tok, prompts, n_tokens, hparams.seed + i)
            for seed_text, gen in zip(prompts, texts, strict=True):
                prefix = (seed_text + gen).replace("{", " ").replace("}", " ").strip()
                templates.append(prefix + ". {}")
        per_model[key] = templates
    return list(per_model[key])


# ---------------------------------------------------------------------------------------------
# keys and values


def _linear_weight(module: Any, transposed: bool) -> torch.Tensor:
    """The projection's weight in (d_out, d_in) layout, whatever its storage."""
    w = module.weight
    return w.t() if transposed else w


@torch.no_grad()
def subject_key(
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


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The output head (with Gemma-2's soft cap) on final hidden states, in float32."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _logits_at(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits at the given (row, position) pairs only: the head is applied where the loss needs it."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    return head_logits(model, hidden[rows, cols])  # (N, V)


class _FusedHeadLoss(torch.autograd.Function):
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
        for start in range(0, weight.shape[0], _FusedHeadLoss.CHUNK):
            w = weight[start : start + _FusedHeadLoss.CHUNK].float()  # (C, H)
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


def _fused_head_ok(model: Any) -> bool:
    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
        and head.weight.device.type == "cpu"
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
    If any of them carries hooks (an installed GRACE codebook), all run as they are.
    """

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
        else:
            self.upper = (
                [low_precision(m, upper_dtype) for m in upper],
                low_precision(self.final_norm, upper_dtype),
                {i: (k.to(upper_dtype), v.to(upper_dtype)) for i, (k, v) in self.prefix_kv.items()},
                additive_mask(upper_dtype)[:, :, p_len:, :],
                tuple(x.to(upper_dtype) for x in self.position_embeddings),
            )

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


@dataclass
class _ValueResult:
    delta: torch.Tensor  # (d_out,)
    losses: list[float] = field(default_factory=list)  # before each update (the δ after the last is not scored)
    nll: list[float] = field(default_factory=list)
    n_guarded: int = 0
    partial: bool = False  # whether the suffix-only forward was used


def optimise_value(
    model: Any,
    tok: Any,
    module: Any,
    templates: Sequence[str],
    request: EditRequest,
    v_init_norm: float,
    hp: ROMEHyperParams,
    *,
    partial: bool = True,
    fused_head: bool = True,
) -> _ValueResult:
    """δ added to the projection's output at the subject's last token, trained for the new target.

    One batched forward pass per step over every rewrite prompt and the KL prompt. With `partial`
    (and an architecture in `PARTIAL_TYPES`), a step runs only layers L.. on the positions from
    the subject's last token on (`SuffixForward`); with `fused_head` the head's loss and gradient
    come from one pass over its weight (`_FusedHeadLoss`). The loss is the same up to float rounding.
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
    if reason is None and hp.layer >= n_layers(model):
        reason = "layer out of range"
    if reason is None:
        runner = SuffixForward(model, rows, edit_pos, hp.layer, pad_id(tok), DTYPES[hp.v_dtype])
        sel_cols = torch.tensor(
            [c - edit_pos[r] for r, c in zip(label_rows, label_cols, strict=True)] + [0], device=device
        )
        where = torch.zeros((len(rows), runner.width - runner.p_len, 1), device=device)
        where[:, 0] = 1.0  # every row's edit position is its first suffix column

        def hidden_fn() -> torch.Tensor:
            return runner.hidden()[sel_rows, sel_cols]

    else:
        log.debug("ROME: full forward per step (%s)", reason)
        ids, mask = pad_right(rows, pad_id(tok), device)
        B, T = ids.shape
        where = torch.zeros((B, T, 1), device=device)  # (B, T, 1): 1 where δ is added
        where[torch.arange(B), torch.tensor(edit_pos)] = 1.0
        sel_cols = torch.tensor([*label_cols, kl_last], device=device)

        def hidden_fn() -> torch.Tensor:
            out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return out[sel_rows, sel_cols]

    d_out = module.weight.shape[0 if not hp.out_proj_transposed else 1]
    delta = torch.zeros(d_out, device=module.weight.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v_init_norm

    def hook(_mod: Any, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + where.to(out.dtype) * delta.to(out.dtype)

    # NLL = mean over prompts of the mean over its target tokens: one weight per label
    label_w = (1.0 / (per_row[row_of_label] * kl_row)).float()
    fused = fused_head and _fused_head_ok(model)
    head_w = model.get_output_embeddings().weight if fused else None
    result = _ValueResult(delta=delta, n_guarded=n_guarded, partial=reason is None)
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
                nll, kl_raw = _FusedHeadLoss.apply(hidden, head_w, label_t, label_w, kl_init)
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


# ---------------------------------------------------------------------------------------------
# the method


class Frozen:
    """Context: eval mode and no parameter gradients, restored on exit."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


# One C serves every edit of a session: its Cholesky factor is kept for the last C seen
# (matched by identity and in-place version), so an edit solves in O(d²) instead of O(d³).
_FACTOR: dict[str, Any] = {}


def _factor(c: torch.Tensor | None, ridge: float) -> torch.Tensor | None:
    if c is None:
        return None
    ref = _FACTOR.get("c")
    if ref is None or ref() is not c or _FACTOR["version"] != c._version or _FACTOR["ridge"] != ridge:
        try:
            factor = rome_math.factor_second_moment(c, ridge)
        except torch.linalg.LinAlgError:  # not positive definite in float64: the plain solve decides
            return None
        _FACTOR.update(c=weakref.ref(c), version=c._version, ridge=ridge, factor=factor)
    return _FACTOR["factor"]


def _edit_one(
    model: Any, tok: Any, module: Any, request: EditRequest, hp: ROMEHyperParams, c: torch.Tensor | None
) -> tuple[rome_math.RankOne, dict[str, Any]]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    templates = context_templates(model, tok, hp)
    timings["templates_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prompts = [t.replace("{}", request.template, 1) for t in templates]  # ROME's templ.format(prompt)
    keys, n_guard_k = subject_key(model, tok, module, prompts, request.subject, hp.guard_position0,
                                  [t == "{}" for t in templates])  # the bare prompt as the user sends it
    k_star = keys.mean(0)
    w = _linear_weight(module, hp.out_proj_transposed)  # (d_out, d_in)
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        v_init = w.to(torch.float64) @ k_star  # (d_out,): the template-averaged output
        if bias is not None:
            v_init = v_init + bias.to(torch.float64)

    factor = _factor(c, hp.mom2_ridge)
    u_rome = rome_math.left_vector(k_star, c, hp.mom2_ridge, factor=factor)
    neighbours = neighbour_keys(model, tok, module, request)
    protected = torch.zeros(0, k_star.shape[0], dtype=torch.float64, device=k_star.device)
    if neighbours is not None and hp.protect_overlap > 0:
        # a key held fixed changes u, which can reach other keys: add them until none is over
        free = neighbours[2].clone()
        for _ in range(PROTECT_ROUNDS):
            over = (overlaps(neighbours[1], u_rome, k_star).abs() > hp.protect_overlap) & free
            if not over.any():
                break
            protected = torch.cat([protected, neighbours[1][over].to(protected.device)])
            free &= ~over
            u_rome = rome_math.equal_gain_vector(torch.cat([k_star[None], protected]), c, hp.mom2_ridge,
                                                 factor=factor, gains=_gains(1, len(protected)))
    rome_gain = float(u_rome @ keys[0]) / float(u_rome @ k_star)  # templates[0] is "{}": the prompt as asked
    u_equal: list[torch.Tensor] = []  # computed once, when a floor first needs it

    def u_for(floor: float) -> torch.Tensor:
        if rome_gain >= floor:
            return u_rome
        if not u_equal:
            u_equal.append(rome_math.equal_gain_vector(torch.cat([keys, protected]), c, hp.mom2_ridge, factor=factor,
                                                       gains=_gains(len(keys), len(protected))))
        return rome_math.toward_gain(u_rome, u_equal[0], keys[0], k_star, floor)

    timings["key_s"] = time.perf_counter() - t0

    floors = [hp.prompt_gain_floor, *sorted(g for g in hp.escalate_gain_floors if g > hp.prompt_gain_floor)]

    def solve(v_star: torch.Tensor) -> tuple[rome_math.RankOne, torch.Tensor, float, bool]:
        """The update at the lowest floor whose edit shows on the prompt (the last floor if none)."""
        u = None
        for floor in floors:
            if u is not None and rome_gain >= floor:  # same u as the floor before
                continue
            u = u_for(floor)
            upd = rome_math.rank_one_update(w, k_star, v_star, u, bias)
            shows = _edit_shows(model, tok, module, upd, request, hp.out_proj_transposed)
            if shows:
                break
        return upd, u, floor, shows

    t0 = time.perf_counter()
    value = optimise_value(model, tok, module, templates, request, float(v_init.norm()), hp)
    timings["value_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    upd, u, floor, shows = solve(v_init + value.delta.to(torch.float64))
    timings["solve_s"] = time.perf_counter() - t0
    retried = not shows and hp.retry_grad_steps > hp.v_num_grad_steps
    if retried:
        log.info("the edit of %r does not show in generation (nll %.3f after %d steps): optimising v* again "
                 "with %d steps", request.text, value.nll[-1], len(value.nll), hp.retry_grad_steps)
        t0 = time.perf_counter()
        value = optimise_value(model, tok, module, templates, request, float(v_init.norm()),
                               dataclasses.replace(hp, v_num_grad_steps=hp.retry_grad_steps))
        upd, u, floor, shows = solve(v_init + value.delta.to(torch.float64))
        timings["retry_s"] = time.perf_counter() - t0
    if floor > hp.prompt_gain_floor:
        log.info("ROME's u gives %r %.0f%% of the edit and it did not show there: gain floor raised to %g",
                 request.text, 100 * rome_gain, floor)
    if not shows:
        log.warning("the edit of %r does not show in generation even at gain floor %g (nll %.3f): "
                    "committed with shows_in_generation false", request.text, floor, value.nll[-1])
    overlap = None if neighbours is None else neighbour_overlap(neighbours, u, k_star)
    prompt_gain = float(u @ keys[0]) / float(u @ k_star)

    info = {
        "subject": request.subject,
        "target_new": request.target_new,
        "n_templates": len(templates),
        "steps": len(value.losses),
        "loss": [round(x, 5) for x in value.losses],
        "nll": [round(x, 5) for x in value.nll],
        "k_norm": float(k_star.norm()),
        "v_init_norm": float(v_init.norm()),
        "v_norm": float((v_init + value.delta.to(torch.float64)).norm()),
        "delta_v_norm": float(value.delta.norm()),
        "denominator": upd.denom,
        "update_norm": upd.norm,
        "weight_norm": float(w.detach().to(torch.float64).norm()),
        "position0_guarded": n_guard_k + value.n_guarded,
        "prompt_gain": round(prompt_gain, 4),
        "rome_prompt_gain": round(rome_gain, 4),
        "gain_floor": floor,
        "equal_gain": rome_gain < floor,  # u moved toward the equal-gain u
        "shows_in_generation": shows,
        "retried": retried,
        **({"protected_keys": len(protected)} if hp.protect_overlap > 0 else {}),
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    if overlap is not None:
        info["neighbour_overlap"] = overlap
        if overlap[1] > OVERLAP_WARNING:
            log.warning("ROME edit of %r also moves %r (key overlap %.2f): subjects that share the edited key "
                        "are changed with it; --set protect_overlap=0.3 holds such keys fixed",
                        request.subject, overlap[0], overlap[1])
    return upd, info


@torch.no_grad()
def _edit_shows(model: Any, tok: Any, module: Any, upd: rome_math.RankOne, request: EditRequest,
                transposed: bool) -> bool:
    """Whether the model with the update, given the prompt as the user sends it, generates the target
    (`shows_in_generation`: kedit.evaluate's greedy continuation and comparison rule)."""
    saved = module.weight.detach().clone()
    a, b = rome_math.to_stored_layout(upd, transposed)
    module.weight.add_((a @ b).to(device=module.weight.device, dtype=module.weight.dtype))
    try:
        return shows_in_generation(model, tok, [request.text], [request.target_new])[0]
    finally:
        module.weight.copy_(saved)


# A neighbour whose key projects onto u this much (relative to k* itself) receives that fraction of the
# edit: at 0.5 its answer usually flips with the subject's.
OVERLAP_WARNING = 0.5


# Rounds of adding neighbour keys to hold fixed (each round re-solves u with the keys found so far).
PROTECT_ROUNDS = 3


def _gains(n_edit: int, n_fixed: int) -> torch.Tensor:
    return torch.cat([torch.ones(n_edit), torch.zeros(n_fixed)]).to(torch.float64)


@torch.no_grad()
def neighbour_keys(
    model: Any, tok: Any, module: Any, request: EditRequest
) -> tuple[list[str], torch.Tensor, torch.Tensor] | None:
    """The request's neighbourhood and locality prompts, the projection's input at each of their
    tokens (B, T, d_in) in float64, and which (prompt, token) pairs are real (not padding, not
    position 0); None when the request has no such prompts. The prompts are read as the user sends
    them (`tokenizer(prompt)`), as they will be queried and scored."""
    prompts = list(request.neighbourhood) + [p for p, _ in request.locality]
    if not prompts:
        return None
    ids, mask = pad_right([prompt_ids(tok, p) for p in prompts], pad_id(tok), input_device(model))
    keys = capture_at_module(model, module, ids, mask)
    valid = mask.bool().cpu()
    valid[:, 0] = False  # the attention sink (or a BOS): its key is unlike any subject's
    return prompts, keys.to(torch.float64).cpu(), valid


def overlaps(keys: torch.Tensor, u: torch.Tensor, k_star: torch.Tensor) -> torch.Tensor:
    """(u·k)/(u·k*) for each key: the share of the edit a rank-one update gives it."""
    return (keys @ u.to(keys.device)) / float(u @ k_star)


def neighbour_overlap(neighbours: tuple[list[str], torch.Tensor, torch.Tensor], u: torch.Tensor,
                      k_star: torch.Tensor) -> tuple[str, float]:
    """The neighbourhood or locality prompt most moved by the update, and by how much.

    A rank-one update changes the output at key k by (u·k)/(u·k*) of what it does at k*. ROME's
    known failure is a neighbour whose key at some token is close to k* in that metric (subjects
    sharing their last token, "Mawson Glacier" and "Debenham Glacier"): it is edited too. Every
    position after the start token is checked, since the neighbour's subject span is unknown.
    """
    prompts, keys, valid = neighbours
    ratio = overlaps(keys, u, k_star).masked_fill(~valid, 0.0)  # (B, T)
    per_prompt = ratio.abs().amax(dim=1)
    worst = int(per_prompt.argmax())
    return prompts[worst], round(float(per_prompt[worst]), 4)


def apply(
    model: Any,
    tok: Any,
    requests: Sequence[EditRequest],
    hparams: ROMEHyperParams,
    *,
    second_moment: torch.Tensor | None = None,
    stats_provider: StatsProvider | None = None,
) -> EditResult:
    """Compute ROME's delta for the requests (applied one after another); the model is left unchanged.

    Args:
        second_moment: C = E[kkᵀ] of the projection's input at `hparams.layer`, (d_in, d_in).
        stats_provider: called as `stats_provider(module_name, layer)` when `second_moment` is None.

    Raises:
        ValueError: no requests, or mom2_adjustment is on and neither C nor a provider is given.
    """
    if not requests:
        raise ValueError("ROME needs at least one request")
    total_layers = n_layers(model)
    if hparams.layer >= total_layers:
        raise ValueError(f"layer={hparams.layer} but the model has {total_layers} layers (0..{total_layers - 1})")
    name = hparams.module_name
    module = get_module(model, name)
    c: torch.Tensor | None = None
    if hparams.mom2_adjustment:
        if second_moment is None and stats_provider is not None:
            second_moment = stats_provider(name, hparams.layer)
        if second_moment is None:
            raise ValueError(
                f"ROME with mom2_adjustment=true needs the second moment E[kkᵀ] of the input of {name}: "
                "pass second_moment= or stats_provider= (kedit stats computes and caches it), "
                "or set mom2_adjustment=false to use C = I"
            )
        c = second_moment

    t_start = time.perf_counter()
    original = module.weight.detach().clone()
    lams, us, infos = [], [], []
    try:
        with Frozen(model):
            for i, request in enumerate(requests):
                upd, info = _edit_one(model, tok, module, request, hparams, c)
                lams.append(upd.lam)
                us.append(upd.u)
                infos.append(info)
                if info["update_norm"] > 0.5 * info["weight_norm"]:
                    log.warning(
                        "ROME update for %r has norm %.3g, %.0f%% of the weight's: the edit may damage the model",
                        request.subject,
                        info["update_norm"],
                        100 * info["update_norm"] / info["weight_norm"],
                    )
                if i + 1 < len(requests):  # later requests see the earlier edits
                    a, b = rome_math.to_stored_layout(upd, hparams.out_proj_transposed)
                    with torch.no_grad():
                        module.weight.add_((a @ b).to(device=module.weight.device, dtype=module.weight.dtype))
    finally:
        with torch.no_grad():
            module.weight.copy_(original)

    lam = torch.stack(lams, 1)  # (d_out, r)
    u = torch.stack(us, 0)  # (r, d_in)
    if hparams.out_proj_transposed:
        a, b = u.t().float().contiguous(), lam.t().float().contiguous()  # (d_in, r), (r, d_out)
    else:
        a, b = lam.float().contiguous(), u.float().contiguous()  # (d_out, r), (r, d_in)
    info_all: dict[str, Any] = {
        "method": "rome",
        "layer": hparams.layer,
        "module": name,
        "mom2_adjustment": hparams.mom2_adjustment,
        "update_norm": float(sum(i["update_norm"] for i in infos)),
        "requests": infos,
        "min_prompt_gain": min(i["prompt_gain"] for i in infos),
        **({"max_neighbour_overlap": max(i["neighbour_overlap"][1] for i in infos if "neighbour_overlap" in i)}
           if any("neighbour_overlap" in i for i in infos) else {}),
        "total_s": round(time.perf_counter() - t_start, 4),
    }
    return EditResult(deltas={name + ".weight": LowRank(a, b)}, info=info_all)


register_method("rome", ROMEHyperParams, apply)
