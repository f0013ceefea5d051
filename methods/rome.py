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

Position-0 hazard: a tokenizer that adds no BOS (SmolLM2) puts a one-token subject at position 0
of the bare template, the attention-sink position, whose key is unlike any other; keys read
there gave divisors near zero and updates ten times too large. Prompts whose subject would end at
position 0 get the tokenizer's BOS (or EOS) token in front (`info["position0_guarded"]`).
"""

from __future__ import annotations

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

from kedit.arch import arch_for, get_module, n_layers

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

    layer: int
    rewrite_module_tmp: str  # the MLP output projection, "{}" = layer
    out_proj_transposed: bool = False  # GPT-2 Conv1D stores Wᵀ
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    mom2_adjustment: bool = True  # u = C⁻¹k*; false means C = I (EasyEdit's default)
    mom2_n_samples: int = 10000  # texts behind C, for the caller's statistics cache key
    mom2_ridge: float = 1e-6  # C + ridge·mean(diag C)·I, so few-sample statistics stay invertible
    # (tokens, count) of generated prefixes. ROME's [[5,10],[10,10]] (21 templates) costs 4x the
    # time per step; bench/rome_counterfact.py compares the two on SmolLM2.
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 5),)
    context_template_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    kl_prompt: str = "{} is a"
    guard_position0: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if "{}" not in self.rewrite_module_tmp:
            raise ValueError(f"rewrite_module_tmp must contain '{{}}' for the layer, got {self.rewrite_module_tmp!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss", "mom2_ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mom2_n_samples < 1:
            raise ValueError(f"mom2_n_samples must be >= 1, got {self.mom2_n_samples}")
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


def _input_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def _pad_id(tok: Any) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _adds_bos(tok: Any) -> bool:
    """Whether the tokenizer starts every text with its BOS token itself."""
    ids = tok("a")["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def guard_token_id(tok: Any) -> int:
    """The token put in front of prompts that would otherwise start at the attention sink.

    A document separator reads as a fresh start: "<|endoftext|>" where the vocabulary has it
    (GPT-2, SmolLM2, Qwen; SmolLM2's declared BOS is the chat token <|im_start|>), else BOS, else EOS.
    """
    tid = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tok.unk_token_id and tid < len(tok):
        return tid
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no BOS or EOS token to guard position 0; set guard_position0=false")


def target_ids(tok: Any, target: str) -> list[int]:
    """Token ids of " target" as it follows a prompt (a lone leading space token is dropped)."""
    if not target.strip():
        raise ValueError(f"the target {target!r} tokenizes to nothing")
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and tok.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"the target {target!r} tokenizes to nothing")
    return list(ids)


def encode_with_subject(tok: Any, template: str, subject: str, guard: bool) -> tuple[list[int], int, bool]:
    """Ids of template with the subject, the index of the subject's last token, and whether guarded."""
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
    if guarded:
        ids, last = [guard_token_id(tok), *ids], 1
    return ids, last, guarded


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
    prefix = [] if _adds_bos(tok) else [guard_token_id(tok)]
    encoded = [prefix + list(tok(s)["input_ids"]) for s in seeds]
    width = max(len(e) for e in encoded)
    pad = _pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(_input_device(model)),
            attention_mask=mask.to(_input_device(model)),
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
    model: Any, tok: Any, module: Any, templates: Sequence[str], subject: str, guard: bool
) -> tuple[torch.Tensor, int]:
    """k*: the projection's input at the subject's last token, averaged over the templates.

    Returns (k* in float64, number of prompts that needed the position-0 guard).
    """
    rows, positions, n_guarded = [], [], 0
    for t in templates:
        ids, last, guarded = encode_with_subject(tok, t, subject, guard)
        rows.append(ids)
        positions.append(last)
        n_guarded += guarded
    ids, mask = _pad_right(rows, _pad_id(tok), _input_device(model))
    captured: list[torch.Tensor] = []

    def hook(_mod: Any, args: tuple) -> None:
        captured.append(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    x = captured[0]  # (B, T, d_in)
    keys = x[torch.arange(len(rows)), torch.tensor(positions)]  # (B, d_in)
    return keys.to(torch.float64).mean(0), n_guarded


def _logits_at(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits at the given (row, position) pairs only: the head is applied where the loss needs it."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    logits = model.get_output_embeddings()(hidden[rows, cols])  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


@dataclass
class _ValueResult:
    delta: torch.Tensor  # (d_out,)
    losses: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    n_guarded: int = 0


def optimise_value(
    model: Any,
    tok: Any,
    module: Any,
    templates: Sequence[str],
    request: EditRequest,
    v_init_norm: float,
    hp: ROMEHyperParams,
) -> _ValueResult:
    """δ added to the projection's output at the subject's last token, trained for the new target.

    One batched forward pass per step over every rewrite prompt and the KL prompt.
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
        ids, last, guarded = encode_with_subject(tok, full, request.subject, hp.guard_position0)
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

    device = _input_device(model)
    ids, mask = _pad_right(rows, _pad_id(tok), device)
    B, T = ids.shape
    where = torch.zeros((B, T, 1), device=device)  # (B, T, 1): 1 where δ is added
    where[torch.arange(B), torch.tensor(edit_pos)] = 1.0
    sel_rows = torch.tensor([*label_rows, kl_row], device=device)
    sel_cols = torch.tensor([*label_cols, kl_last], device=device)
    n_labels = len(labels)
    label_t = torch.tensor(labels, device=device)
    row_of_label = torch.tensor(label_rows, device=device)
    per_row = torch.bincount(row_of_label, minlength=kl_row).clamp(min=1).float()

    d_out = module.weight.shape[0 if not hp.out_proj_transposed else 1]
    delta = torch.zeros(d_out, device=module.weight.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v_init_norm

    def hook(_mod: Any, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + where.to(out.dtype) * delta.to(out.dtype)

    result = _ValueResult(delta=delta, n_guarded=n_guarded)
    kl_init: torch.Tensor | None = None
    handle = module.register_forward_hook(hook)
    try:
        for step in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = _logits_at(model, ids, mask, sel_rows, sel_cols)  # (n_labels + 1, V)
            logp = logits.log_softmax(-1)
            tok_lp = logp[:n_labels].gather(1, label_t[:, None])[:, 0]  # (n_labels,)
            nll = -(torch.zeros(kl_row, device=device).index_add(0, row_of_label, tok_lp) / per_row).mean()
            kl_logp = logp[n_labels:]  # (1, V)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()  # δ = 0 at step 0: the unedited distribution
            kl = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            decay = hp.v_weight_decay * (delta.norm() / v_init_norm**2)
            loss = nll + kl + decay
            result.losses.append(float(loss.detach()))
            result.nll.append(float(nll.detach()))
            if result.losses[-1] < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
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


class _Frozen:
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


def _edit_one(
    model: Any, tok: Any, module: Any, request: EditRequest, hp: ROMEHyperParams, c: torch.Tensor | None
) -> tuple[rome_math.RankOne, dict[str, Any]]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    templates = context_templates(model, tok, hp)
    timings["templates_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    k_star, n_guard_k = subject_key(model, tok, module, templates, request.subject, hp.guard_position0)
    w = _linear_weight(module, hp.out_proj_transposed)  # (d_out, d_in)
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        v_init = w.to(torch.float64) @ k_star  # (d_out,): the template-averaged output
        if bias is not None:
            v_init = v_init + bias.to(torch.float64)
    timings["key_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    value = optimise_value(model, tok, module, templates, request, float(v_init.norm()), hp)
    timings["value_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    v_star = v_init + value.delta.to(torch.float64)
    u = rome_math.left_vector(k_star, c, hp.mom2_ridge)
    upd = rome_math.rank_one_update(w, k_star, v_star, u, bias)
    timings["solve_s"] = time.perf_counter() - t0

    info = {
        "subject": request.subject,
        "target_new": request.target_new,
        "n_templates": len(templates),
        "steps": len(value.losses),
        "loss": [round(x, 5) for x in value.losses],
        "nll": [round(x, 5) for x in value.nll],
        "k_norm": float(k_star.norm()),
        "v_init_norm": float(v_init.norm()),
        "v_norm": float(v_star.norm()),
        "delta_v_norm": float(value.delta.norm()),
        "denominator": upd.denom,
        "update_norm": upd.norm,
        "weight_norm": float(w.detach().to(torch.float64).norm()),
        "position0_guarded": n_guard_k + value.n_guarded,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    return upd, info


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
        with _Frozen(model):
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
                        module.weight.add_((a @ b).to(module.weight.dtype))
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
        "total_s": round(time.perf_counter() - t_start, 4),
    }
    return EditResult(deltas={name + ".weight": LowRank(a, b)}, info=info_all)


register_method("rome", ROMEHyperParams, apply)
