"""ROME: Rank-One Model Editing (Meng et al. 2022), one fact per request, faithful to the paper.

Steps:
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
the output head's loss and gradient come from one pass over its weight (`FusedHeadLoss`).
Both give the full forward's loss trajectory up to float rounding (tests/methods/test_rome.py);
they live in methods/forward.py, the v* optimisation in methods/values.py (`optimise_single_value`).
C's Cholesky factor is computed once per C and call (`_factor`, a `TensorCache` the caller may pass
to share it across calls).

Position-0 hazard: a tokenizer that adds no BOS (SmolLM2) puts a one-token subject at position 0
of the bare template, the attention-sink position, whose key is unlike any other; keys read
there gave divisors near zero and updates ten times too large. The context templates are read
after a document separator (`kedit.eval.metrics.start_token_id`); the bare prompt "{}" is read as the
user sends it (`tokenizer(prompt)`), so the key a user's query meets is one of those k* averages,
and only where its subject's last token would sit at the sink does it get the separator too
(`info["position0_guarded"]` counts those prompts).

Each edit is checked where it will be used: the edited model, given the prompt as sent, must
generate the target within kedit.eval.metrics's greedy continuation (`shows_in_generation`); if not,
the gain floor is raised, then v* optimised again (see `_edit_one`).
"""


from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kedit.methods import rome_math
from kedit.methods.base import EditRequest, EditResult, LowRank, register_method
from kedit.methods.capture import capture_at_module
from kedit.methods.freeze import frozen
from kedit.methods.hparams import MAX_STEPS, bounded, layer_field, require_slot, validate
from kedit.methods.lowp import check_dtype, dtype_name
from kedit.methods.prompts import context_templates, input_device, pad_id, pad_right
from kedit.methods.tensor_cache import TensorCache
from kedit.methods.values import ValueSettings, optimise_single_value, template_keys

from kedit.eval.metrics import prompt_ids, shows_in_generation
from kedit.model.arch import arch_for, get_module, n_layers
from kedit.model.placement import add_to_weight, read_weight, weight_restored

__all__ = [
    "ROMEHyperParams",
    "StatsProvider",
    "apply",
    "second_moment_needed",
]

log = logging.getLogger(__name__)

StatsProvider = Callable[[str, int], torch.Tensor]  # (module name, layer) -> E[k kᵀ], (d_in, d_in)


@dataclass
class ROMEHyperParams:
    """ROME's knobs; `for_model` fills the layer and module names from kedit.model.arch."""

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
        require_slot(self, "rewrite_module_tmp", "layer")
        check_dtype(self.v_dtype)
        self.context_template_length_params = tuple(tuple(p) for p in self.context_template_length_params)  # type: ignore[assignment]
        for p in self.context_template_length_params:
            if len(p) != 2 or p[0] < 1 or p[1] < 0:
                raise ValueError(f"context_template_length_params entries are [tokens >= 1, count >= 0], got {list(p)}")
        if any(p[1] > 0 for p in self.context_template_length_params) and not self.context_template_seeds:
            raise ValueError("context_template_seeds must not be empty when templates are generated")
        require_slot(self, "kl_prompt", "subject")

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

    def value_settings(self) -> ValueSettings:
        """The knobs of v*'s optimisation (`values.optimise_single_value`)."""
        return ValueSettings(self.v_num_grad_steps, self.v_lr, self.v_weight_decay, self.clamp_norm_factor,
                             self.kl_factor, self.early_stop_loss, self.kl_prompt, self.guard_position0, self.v_dtype)


def second_moment_needed(hparams: ROMEHyperParams) -> tuple[str, int] | None:
    """(module name, layer) whose input statistics `apply` needs, or None when C = I."""
    return (hparams.module_name, hparams.layer) if hparams.mom2_adjustment else None




# ---------------------------------------------------------------------------------------------
# the edited projection


def _linear_weight(module: Any, transposed: bool) -> torch.Tensor:
    """The projection's weight in (d_out, d_in) layout, whatever its storage."""
    w = read_weight(module)
    return w.t() if transposed else w


# ---------------------------------------------------------------------------------------------
# the method


def _factor(cache: TensorCache, c: torch.Tensor | None, ridge: float) -> torch.Tensor | None:
    """C's Cholesky factor (with the ridge), computed once per C in `cache`: an edit then solves in
    O(d²) instead of O(d³). None when C is not given or not positive definite in float64 (the
    plain solve then decides, and reports)."""
    if c is None:
        return None
    try:
        return cache.get(("cholesky", ridge), c, lambda t: rome_math.factor_second_moment(t, ridge))
    except torch.linalg.LinAlgError:
        return None


def _edit_one(
    model: Any, tok: Any, module: Any, request: EditRequest, hp: ROMEHyperParams, c: torch.Tensor | None,
    factors: TensorCache,
) -> tuple[rome_math.RankOne, dict[str, Any]]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    templates = context_templates(model, tok, hp)
    timings["templates_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prompts = [t.replace("{}", request.template, 1) for t in templates]  # ROME's templ.format(prompt)
    keys, n_guard_k = template_keys(model, tok, module, prompts, request.subject, hp.guard_position0,
                                    [t == "{}" for t in templates])  # the bare prompt as the user sends it
    k_star = keys.mean(0)
    w = _linear_weight(module, hp.out_proj_transposed)  # (d_out, d_in)
    bias = read_weight(module, "bias") if getattr(module, "bias", None) is not None else None
    with torch.no_grad():
        v_init = w.to(torch.float64) @ k_star  # (d_out,): the template-averaged output
        if bias is not None:
            v_init = v_init + bias.to(torch.float64)

    factor = _factor(factors, c, hp.mom2_ridge)
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
    value = optimise_single_value(model, tok, module, hp.layer, templates, request, float(v_init.norm()),
                                  hp.value_settings())
    timings["value_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    upd, u, floor, shows = solve(v_init + value.delta.to(torch.float64))
    timings["solve_s"] = time.perf_counter() - t0
    retried = not shows and hp.retry_grad_steps > hp.v_num_grad_steps
    if retried:
        log.info("the edit of %r does not show in generation (nll %.3f after %d steps): optimising v* again "
                 "with %d steps", request.text, value.nll[-1], len(value.nll), hp.retry_grad_steps)
        t0 = time.perf_counter()
        value = optimise_single_value(model, tok, module, hp.layer, templates, request, float(v_init.norm()),
                                      dataclasses.replace(hp.value_settings(), v_num_grad_steps=hp.retry_grad_steps))
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
        "v_dtype": dtype_name(value.upper_dtype),  # what the layers above ran in (kedit/edit/run.py records it)
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
    (`shows_in_generation`: kedit.eval.metrics's greedy continuation and comparison rule)."""
    a, b = rome_math.to_stored_layout(upd, transposed)
    with weight_restored([module]):
        add_to_weight(module, a @ b)
        return shows_in_generation(model, tok, [request.text], [request.target_new])[0]


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
    factor_cache: TensorCache | None = None,
) -> EditResult:
    """Compute ROME's delta for the requests (applied one after another); the model is left unchanged.

    Args:
        second_moment: C = E[kkᵀ] of the projection's input at `hparams.layer`, (d_in, d_in).
        stats_provider: called as `stats_provider(module_name, layer)` when `second_moment` is None.
        factor_cache: where C's Cholesky factor is kept; pass the same one to calls that edit with
            the same C in memory to factor it once (by default each call factors it once).

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

    factors = TensorCache() if factor_cache is None else factor_cache
    t_start = time.perf_counter()
    lams, us, infos = [], [], []
    with weight_restored([module]), frozen(model, eval_mode=True):
        for i, request in enumerate(requests):
            upd, info = _edit_one(model, tok, module, request, hparams, c, factors)
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
                add_to_weight(module, a @ b)

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
        "v_dtype_used": sorted({i["v_dtype"] for i in infos}),
        **({"max_neighbour_overlap": max(i["neighbour_overlap"][1] for i in infos if "neighbour_overlap" in i)}
           if any("neighbour_overlap" in i for i in infos) else {}),
        "total_s": round(time.perf_counter() - t_start, 4),
    }
    return EditResult(deltas={name + ".weight": LowRank(a, b)}, info=info_all)


register_method("rome", ROMEHyperParams, apply)
