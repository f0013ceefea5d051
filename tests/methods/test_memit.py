"""MEMIT and AlphaEdit: their closed forms, the layer-spreading pipeline, and AlphaEdit's memory."""

import dataclasses

import pytest
import torch
from kedit.methods import alphaedit, memit, memit_math, values
from kedit.methods.base import EditRequest, get_method
from kedit.methods.freeze import frozen
from kedit.methods.prompts import encode_with_subject, target_ids
from kedit.methods.stats import accumulate_second_moment

from kedit.core.delta import LowRank, apply_step
from kedit.edit.run import hparams_as_run
from kedit.eval.metrics import teacher_forced
from kedit.model.arch import arch_for, get_module

# Each subject ends its prompt and each target is one token of the tiny vocabulary: in a 3-layer
# random model an edit must act at the predicting position (one random attention layer above the
# edit cannot carry it; tests/methods/test_rome.py).
REQS = [
    EditRequest(prompt="The capital city is France", subject="France", target_new="Japan"),
    EditRequest(prompt="The capital of Spain is Tokyo", subject="Tokyo", target_new="Paris"),
    EditRequest(prompt="Madrid makes the Apple", subject="Apple", target_new="capital"),
]
TEXTS = [
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Madrid is in Spain. London, Rome, Paris.",
    "Danielle Darrieux speaks French.",
    "Tokyo is in Japan. Apple makes the iPhone.",
] * 3


def low_rank_keys(d: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                                 dtype=torch.float64))


def test_memit_update_is_the_least_squares_optimum():
    """Δ* = R Kᵀ(λC + KKᵀ)⁻¹ zeroes the gradient of ‖ΔK − R‖² + λ tr(ΔCΔᵀ), and beats perturbations."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n = 24, 16, 5
    k0 = torch.randn(d_in, 200, generator=g, dtype=torch.float64)
    c = k0 @ k0.t() / 200
    k = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    lam = 3.0
    a, b = memit_math.memit_update(r, k, c, lam)
    delta = a @ b.t()

    def objective(x: torch.Tensor) -> float:
        return float(((x @ k - r) ** 2).sum() + lam * torch.trace(x @ c @ x.t()))

    grad = 2 * (delta @ k - r) @ k.t() + 2 * lam * delta @ c
    assert grad.abs().max() < 1e-10
    best = objective(delta)
    for _ in range(5):
        assert objective(delta + 1e-3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)) > best


def test_alphaedit_leaves_preserved_keys_unchanged():
    """Keys in C's large-eigenvalue subspace keep their outputs to numerical precision."""
    d_in, d_out = 32, 12
    preserved = low_rank_keys(d_in, 400, rank=20)  # spans 20 of 32 directions
    c = preserved @ preserved.t() / 400
    p, dim = memit_math.nullspace_projector(c, threshold=1e-8)
    assert dim == 12
    g = torch.Generator().manual_seed(3)
    k = torch.randn(d_in, 4, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, 4, generator=g, dtype=torch.float64)
    prior = torch.randn(d_in, 6, generator=g, dtype=torch.float64)
    a, b = memit_math.alphaedit_update(r, k, p, prior, alpha=0.1)
    delta = a @ b.t()
    assert delta.norm() > 1e-2  # it does change something
    moved = (delta @ preserved).norm() / (delta.norm() * preserved.norm())
    assert moved < 1e-12
    # without the projection (P = I) the same keys would move
    a_i, b_i = memit_math.alphaedit_update(r, k, torch.eye(d_in, dtype=torch.float64), prior, alpha=0.1)
    assert ((a_i @ b_i.t()) @ preserved).norm() / preserved.norm() > 1e-2


def test_alphaedit_prior_keys_pull_toward_keeping_earlier_edits():
    """With K_p, the update moves earlier edits' keys less than without them."""
    d_in, d_out = 32, 12
    p = torch.eye(d_in, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    k = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, 3, generator=g, dtype=torch.float64)
    prior = k + 0.3 * torch.randn(d_in, 3, generator=g, dtype=torch.float64)  # keys near the new ones
    free = memit_math.alphaedit_update(r, k, p, None, 1.0)
    held = memit_math.alphaedit_update(r, k, p, prior, 1.0)
    assert ((held[0] @ held[1].t()) @ prior).norm() < ((free[0] @ free[1].t()) @ prior).norm()


def tiny_memit_hparams(model, cls=memit.MEMITHyperParams, **kw):
    hp = cls.for_model(model)
    # tiny random models have tiny residuals: the clamp and decay of a real model would pin δ at 0
    base = dict(context_template_length_params=((3, 2),), v_num_grad_steps=30, v_lr=0.5, v_weight_decay=0.0,
                clamp_norm_factor=50.0, early_stop_loss=0.0, mom2_adjustment=False, mom2_update_weight=0.05,
                v_batch_size=2)
    base.update(kw)
    return dataclasses.replace(hp, **base)


def target_acc(model, tok, reqs):
    return [r.accuracy for r in teacher_forced(model, tok, [q.text for q in reqs], [q.target_new for q in reqs])]


def apply_deltas(model, deltas):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].copy_(apply_step(params[name].detach(), delta))


def test_memit_edits_every_request_in_one_update(tiny_llama, tiny_tok):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    hp = tiny_memit_hparams(tiny_llama)
    assert len(hp.layers) >= 2
    result = get_method("memit").apply(tiny_llama, tiny_tok, REQS, hp)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())  # model untouched
    arch = arch_for(tiny_llama)
    assert set(result.deltas) == {arch.out_proj_weight(layer) for layer in hp.layers}
    assert all(isinstance(d, LowRank) and d.rank == len(REQS) for d in result.deltas.values())
    assert [r["target_reached"] > 0.9 for r in result.info["requests"]] == [True] * len(REQS)
    assert [r["shows_in_generation"] for r in result.info["requests"]] == [True] * len(REQS)
    assert target_acc(tiny_llama, tiny_tok, REQS) != [1.0] * len(REQS)
    try:
        apply_deltas(tiny_llama, result.deltas)
        assert target_acc(tiny_llama, tiny_tok, REQS) == [1.0] * len(REQS)
    finally:
        tiny_llama.load_state_dict(before)


def test_batched_values_match_one_at_a_time(tiny_llama, tiny_tok):
    """Batching the δ optimisation across requests changes nothing but the speed."""
    one = memit.apply(tiny_llama, tiny_tok, REQS, tiny_memit_hparams(tiny_llama, v_batch_size=1))
    many = memit.apply(tiny_llama, tiny_tok, REQS, tiny_memit_hparams(tiny_llama, v_batch_size=3))
    for name, d in one.deltas.items():
        torch.testing.assert_close(d.a @ d.b, many.deltas[name].a @ many.deltas[name].b, rtol=1e-3, atol=1e-5)


def test_gpt2_conv1d_layout(tiny_gpt2, tiny_tok):
    hp = tiny_memit_hparams(tiny_gpt2)
    result = memit.apply(tiny_gpt2, tiny_tok, REQS[:2], hp)
    for name, delta in result.deltas.items():
        assert delta.shape == tuple(dict(tiny_gpt2.named_parameters())[name].shape)


def test_memit_needs_statistics_or_says_so(tiny_llama, tiny_tok):
    hp = tiny_memit_hparams(tiny_llama, mom2_adjustment=True)
    with pytest.raises(ValueError, match="second moment"):
        memit.apply(tiny_llama, tiny_tok, REQS[:1], hp)
    with pytest.raises(ValueError, match="layers"):
        dataclasses.replace(hp, layers=(3, 1))


def test_alphaedit_pipeline_keeps_preserved_keys_and_returns_its_keys(tiny_llama, tiny_tok):
    hp = tiny_memit_hparams(tiny_llama, alphaedit.AlphaEditHyperParams, mom2_adjustment=True, L2=1e-3,
                            nullspace_threshold=0.1)  # about half of the tiny model's 64 directions
    cs = {layer: accumulate_second_moment(tiny_llama, tiny_tok, hp.module_name(layer), TEXTS).mom2()
          for layer in hp.layers}
    result = alphaedit.apply(tiny_llama, tiny_tok, REQS[:2], hp, second_moments_by_layer=cs)
    assert set(result.memory) == {f"keys.{layer}" for layer in hp.layers}
    assert all(k.shape[1] == 2 for k in result.memory.values())
    for layer in hp.layers:
        delta = result.deltas[hp.module_name(layer) + ".weight"]
        evals, evecs = torch.linalg.eigh(cs[layer].double())
        kept = evecs[:, evals >= hp.nullspace_threshold]  # the preserved directions
        assert kept.shape[1] > 0
        moved = (delta.a.double() @ (delta.b.double() @ kept)).norm() / (delta.a.double() @ delta.b.double()).norm()
        assert moved < 1e-4
    again = alphaedit.apply(tiny_llama, tiny_tok, REQS[2:], hp, second_moments_by_layer=cs,
                            memory=[result.memory])
    assert set(again.info["prior_keys"].values()) == {2}


def test_memit_module_names_follow_the_architecture(tiny_model):
    hp = memit.MEMITHyperParams.for_model(tiny_model)
    for layer in hp.layers:
        assert get_module(tiny_model, hp.module_name(layer)) is not None


def test_value_chunks_report_the_dtype_each_ran_in(tiny_tok):
    """A sliding window narrower than one chunk's prompts sends that chunk to the full forward (the
    model's float32) while the other runs bfloat16 copies: the fit reports both, and the commit
    keeps the requested v_dtype, which re-derives the same mix on replay."""
    from transformers import AutoModelForCausalLM, MistralConfig

    short = REQS[2]
    long = EditRequest(prompt="The capital of France is Paris and the capital city is France", subject="France",
                       target_new="Japan")

    def width(r: EditRequest) -> int:  # the longest row of its chunk (one template, "{}")
        rewrite = len(encode_with_subject(tiny_tok, r.template, r.subject, True)[0]) + len(
            target_ids(tiny_tok, r.target_new)) - 1
        return max(rewrite, len(encode_with_subject(tiny_tok, "{} is a", r.subject, True)[0]))

    assert width(short) < width(long)
    config = MistralConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, max_position_embeddings=128, vocab_size=len(tiny_tok),
                           head_dim=16, sliding_window=width(short), pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    hp = dataclasses.replace(memit.MEMITHyperParams.for_model(model), v_num_grad_steps=2, mom2_adjustment=False)
    module = get_module(model, hp.module_name(hp.layers[-1]))
    with frozen(model, eval_mode=True):
        fit = values.optimise_batched_values(model, tiny_tok, module, hp.layers[-1], ["{}"], [short, long],
                                             torch.ones(2), hp.value_settings(), chunk=1)
    assert fit.upper_dtypes == {torch.bfloat16, torch.float32}
    assert hparams_as_run(hp, {"v_dtype_used": ["bfloat16", "float32"]}).v_dtype == "bfloat16"
    assert hparams_as_run(hp, {"v_dtype_used": ["float32"]}).v_dtype == "float32"
