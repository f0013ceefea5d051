import dataclasses
import functools

import pytest
import torch
from kedit.methods import forward, lowp, prompts, rome, rome_math, values
from kedit.methods.base import EditRequest, get_method
from kedit.methods.freeze import frozen
from kedit.methods.hparams import hparams_from_overrides, hparams_to_dict
from kedit.methods.tensor_cache import TensorCache

from kedit.core.delta import LowRank, apply_step
from kedit.eval.metrics import start_token_id, token_accuracy
from kedit.model.arch import arch_for, get_module
from tests.tiny import MODEL_TYPES, make_model, make_tokenizer

REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome")
# The subject ends the prompt: in a 3-layer random model an edit must act at the predicting position
# (one random attention layer above the edit cannot carry it).
REQ_DIRECT = EditRequest(prompt="The capital city is France", subject="France", target_new="Rome")


def fast_hparams(model, **kw):
    hp = rome.ROMEHyperParams.for_model(model)
    # Random tiny models have tiny MLP outputs: GPT-2's weight decay (0.5/‖v‖²) and the 4‖v‖ clamp
    # would pin δ near zero, so they are loosened here.
    base = dict(
        mom2_adjustment=False,
        context_template_length_params=((3, 3),),
        v_num_grad_steps=40,
        v_weight_decay=0.0,
        clamp_norm_factor=50.0,
    )
    base.update(kw)
    return dataclasses.replace(hp, **base)


def random_second_moment(d, n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return k, (k.t() @ k) / n


# ------------------------------------------------------------------ closed form


@pytest.mark.parametrize("with_c", [False, True])
def test_closed_form_writes_v_star(with_c):
    torch.manual_seed(0)
    d_out, d_in = 12, 20
    w, b = torch.randn(d_out, d_in), torch.randn(d_out)
    k, v = torch.randn(d_in), torch.randn(d_out)
    c = random_second_moment(d_in)[1] if with_c else None
    upd = rome_math.rank_one_update(w, k, v, rome_math.left_vector(k, c), b)
    w_new = w.double() + torch.outer(upd.lam, upd.u)
    torch.testing.assert_close(w_new @ k.double() + b.double(), v.double(), rtol=1e-10, atol=1e-10)


def test_closed_form_is_the_least_squares_minimiser():
    """With C = KKᵀ/n, ROME's update minimises ‖ΔK‖ subject to (W+Δ)k* = v* (Meng et al. eq. 2)."""
    torch.manual_seed(1)
    d_out, d_in = 6, 10
    keys, c = random_second_moment(d_in, n=200)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    k, v = torch.randn(d_in, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
    upd = rome_math.rank_one_update(w, k, v, rome_math.left_vector(k, c))
    delta = torch.outer(upd.lam, upd.u)
    # KKT: ΔC has every row proportional to k*ᵀ (the only constraint direction).
    dc = delta @ c
    proj = torch.outer(dc @ k / (k @ k), k)
    torch.testing.assert_close(dc, proj, rtol=1e-8, atol=1e-8)

    # Any other feasible update (Δ + E with E k* = 0) disturbs the other keys more.
    def cost(d):
        return float(((d @ keys.t()) ** 2).sum())

    for seed in range(5):
        e = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        e = e - torch.outer(e @ k, k) / (k @ k)  # E k* = 0
        assert cost(delta + 1e-2 * e) > cost(delta)
    # C = I instead gives a different (costlier in the C metric) update.
    upd_i = rome_math.rank_one_update(w, k, v, rome_math.left_vector(k, None))
    assert cost(torch.outer(upd_i.lam, upd_i.u)) > cost(delta)


def test_stored_layout_conv1d_writes_v_star(tiny_gpt2):
    """GPT-2's Conv1D keeps Wᵀ: the delta, applied by the engine, maps k* to v* through the module."""
    module = get_module(tiny_gpt2, arch_for(tiny_gpt2).out_proj(1))
    d_in, d_out = module.weight.shape
    torch.manual_seed(2)
    k, v = torch.randn(d_in), torch.randn(d_out)
    w_lin = module.weight.detach().t()
    upd = rome_math.rank_one_update(w_lin, k, v, rome_math.left_vector(k, None), module.bias)
    a, b = rome_math.to_stored_layout(upd, transposed=True)
    new = apply_step(module.weight.detach(), LowRank(a, b))
    out = k @ new + module.bias.detach()
    torch.testing.assert_close(out, v, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the method on tiny models


def test_edit_makes_target_the_argmax_and_leaves_model_unchanged(tiny_model, tiny_tok):
    hp = fast_hparams(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in tiny_model.named_parameters()}
    result = rome.apply(tiny_model, tiny_tok, [REQ_DIRECT], hp)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in tiny_model.named_parameters()}

    name = arch_for(tiny_model).out_proj_weight(hp.layer)
    assert set(result.deltas) == {name}
    delta = result.deltas[name]
    assert isinstance(delta, LowRank) and delta.rank == 1
    weight = dict(tiny_model.named_parameters())[name]
    assert delta.shape == tuple(weight.shape)
    info = result.info["requests"][0]
    assert info["update_norm"] > 0 and info["denominator"] > 0 and info["loss"][-1] < info["loss"][0]

    target = prompts.target_ids(tiny_tok, "Rome")[0]
    ids = torch.tensor([tiny_tok(REQ_DIRECT.text)["input_ids"]])
    assert tiny_model(ids).logits[0, -1].argmax() != target  # not already there
    with torch.no_grad():
        original = weight.detach().clone()
        weight.copy_(apply_step(original, delta))
        try:
            assert tiny_model(ids).logits[0, -1].argmax() == target
        finally:
            weight.copy_(original)


def test_with_second_moment_and_provider(tiny_llama, tiny_tok):
    hp = fast_hparams(tiny_llama, mom2_adjustment=True, v_num_grad_steps=5)
    name, layer = rome.second_moment_needed(hp)
    d_in = get_module(tiny_llama, name).weight.shape[1]
    c = random_second_moment(d_in)[1].float()
    calls = []

    def provider(module_name, lay):
        calls.append((module_name, lay))
        return c

    r1 = rome.apply(tiny_llama, tiny_tok, [REQ], hp, stats_provider=provider)
    r2 = rome.apply(tiny_llama, tiny_tok, [REQ], hp, second_moment=c)
    assert calls == [(name, layer)]
    d1, d2 = r1.deltas[name + ".weight"], r2.deltas[name + ".weight"]
    torch.testing.assert_close(d1.a @ d1.b, d2.a @ d2.b)
    # u ∝ C⁻¹k*: different from the C = I update.
    r3 = rome.apply(tiny_llama, tiny_tok, [REQ], dataclasses.replace(hp, mom2_adjustment=False))
    d3 = r3.deltas[name + ".weight"]
    assert not torch.allclose(d1.b, d3.b, atol=1e-3)


def test_missing_second_moment_is_a_clear_error(tiny_llama, tiny_tok):
    hp = fast_hparams(tiny_llama, mom2_adjustment=True)
    with pytest.raises(ValueError, match="mom2_adjustment=false"):
        rome.apply(tiny_llama, tiny_tok, [REQ], hp)
    assert rome.second_moment_needed(dataclasses.replace(hp, mom2_adjustment=False)) is None


def test_sequential_requests_give_one_low_rank_delta(tiny_gpt2, tiny_tok):
    hp = fast_hparams(tiny_gpt2)
    reqs = [REQ, EditRequest(prompt="Berlin is the capital of", subject="Berlin", target_new="Spain")]
    result = rome.apply(tiny_gpt2, tiny_tok, reqs, hp)
    (delta,) = result.deltas.values()
    assert delta.rank == 2 and len(result.info["requests"]) == 2
    assert delta.a.shape[0] == get_module(tiny_gpt2, hp.module_name).weight.shape[0]


def test_position0_guard(tiny_llama, tiny_tok):
    """A subject that is the prompt's first token would be read at the attention sink."""
    template, subject = "{} capital is", "The"  # "The" is one token of the tiny vocabulary
    ids, last, guarded = prompts.encode_with_subject(tiny_tok, template, subject, guard=False)
    assert last == 0 and not guarded
    ids_g, last_g, guarded_g = prompts.encode_with_subject(tiny_tok, template, subject, guard=True)
    assert guarded_g and last_g == 1 and ids_g[1:] == ids and ids_g[0] == start_token_id(tiny_tok)
    req = EditRequest(prompt="The capital is", subject="The", target_new="Rome")
    result = rome.apply(tiny_llama, tiny_tok, [req], fast_hparams(tiny_llama, v_num_grad_steps=2))
    assert result.info["requests"][0]["position0_guarded"] == 3  # bare template (key and value) + KL prompt


def test_subject_span_in_template(tiny_tok):
    ids, last, _ = prompts.encode_with_subject(tiny_tok, "Where is {} located", "the Eiffel Tower", guard=True)
    text = tiny_tok.decode(ids[: last + 1])
    assert text.endswith("Tower") and tiny_tok.decode(ids[last + 1 :]).strip() == "located"


def test_context_templates_are_cached_per_model(tiny_gpt2, tiny_llama, tiny_tok):
    hp = fast_hparams(tiny_gpt2)
    t1 = prompts.context_templates(tiny_gpt2, tiny_tok, hp)
    assert t1[0] == "{}" and len(t1) == 4 and all(t.endswith(". {}") for t in t1[1:])
    assert prompts.context_templates(tiny_gpt2, tiny_tok, hp) == t1
    assert tiny_gpt2 in prompts._TEMPLATE_CACHE


# ------------------------------------------------------------------ the suffix-only forward of v*


PARTIAL_CHECKED = [*MODEL_TYPES, "mistral", "qwen3"]


@functools.cache
def _model(model_type):
    """A tiny model of each architecture; Mistral and Qwen3 (not in tests.tiny) share the layer-by-layer path."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    vocab = len(make_tokenizer())
    if model_type in MODEL_TYPES:
        return make_model(model_type, vocab)
    cls = {"mistral": MistralConfig, "qwen3": Qwen3Config}[model_type]
    config = cls(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        max_position_embeddings=128, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        initializer_range=0.2, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _rows_for(tok, model, hp, request):
    templates = prompts.context_templates(model, tok, hp)
    tgt = prompts.target_ids(tok, request.target_new)
    rows, edit_pos = [], []
    for ctx in templates:
        ids, last, _ = prompts.encode_with_subject(tok, ctx.replace("{}", request.template, 1), request.subject, True)
        rows.append(ids + tgt[:-1])
        edit_pos.append(last)
    kl_ids, kl_last, _ = prompts.encode_with_subject(tok, hp.kl_prompt, request.subject, True)
    return [*rows, kl_ids], [*edit_pos, kl_last]


@pytest.mark.parametrize("model_type", PARTIAL_CHECKED)
def test_suffix_forward_logits_equal_full_forward(model_type, tiny_tok):
    """With a non-zero δ at the edit positions, layers L.. on the suffix give the full forward's logits."""
    model = _model(model_type)
    hp = fast_hparams(model, layer=1)
    module = get_module(model, hp.module_name)
    rows, edit_pos = _rows_for(tiny_tok, model, hp, REQ)
    supported = forward.partial_unsupported(model, max(map(len, rows))) is None
    assert supported == (model.config.model_type in forward.PARTIAL_TYPES)
    if not supported:
        pytest.skip(f"{model.config.model_type}: full forward (fallback)")
    torch.manual_seed(3)
    delta = torch.randn(module.weight.shape[0])
    ids, mask = prompts.pad_right(rows, prompts.pad_id(tiny_tok), torch.device("cpu"))
    where_full = torch.zeros((*ids.shape, 1))
    where_full[torch.arange(len(rows)), torch.tensor(edit_pos)] = 1.0
    runner = forward.SuffixForward(model, rows, edit_pos, hp.layer, prompts.pad_id(tiny_tok))
    where = [where_full]
    handle = module.register_forward_hook(lambda _m, _a, out: out + where[0] * delta)
    try:
        with torch.no_grad():
            rr = torch.tensor([r for r, row in enumerate(rows) for _ in range(edit_pos[r], len(row))])
            cc = torch.tensor([c for r, row in enumerate(rows) for c in range(edit_pos[r], len(row))])
            full = forward.logits_at(model, ids, mask, rr, cc)
            where[0] = torch.zeros((len(rows), runner.width - runner.p_len, 1))
            where[0][:, 0] = 1.0
            part = forward.head_logits(model, runner.hidden()[rr, cc - torch.tensor(edit_pos)[rr]])
    finally:
        handle.remove()
    torch.testing.assert_close(part, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("model_type", PARTIAL_CHECKED)
def test_suffix_forward_gives_the_same_loss_trajectory(model_type, tiny_tok, guard):
    """optimise_single_value's fast path (suffix-only forward, fused head) and the plain full forward agree."""
    model = _model(model_type)
    hp = fast_hparams(model, v_num_grad_steps=12, early_stop_loss=0.0, guard_position0=guard, v_dtype="float32")
    # guard=False with a one-token subject first: a row whose prefix is empty.
    req = REQ if guard else EditRequest(prompt="The capital is", subject="The", target_new="Rome")
    module = get_module(model, hp.module_name)
    templates = prompts.context_templates(model, tiny_tok, hp)
    with frozen(model, eval_mode=True):
        settings = hp.value_settings()
        fast = values.optimise_single_value(model, tiny_tok, module, hp.layer, templates, req, 1.0, settings)
        plain = values.optimise_single_value(model, tiny_tok, module, hp.layer, templates, req, 1.0, settings,
                                             partial=False, fused_head=False)
    assert fast.partial == (model.config.model_type in forward.PARTIAL_TYPES) and not plain.partial
    assert fast.upper_dtype == plain.upper_dtype == torch.float32
    assert len(fast.losses) == len(plain.losses) == 11  # 12 steps: 11 updates, each after a scored forward
    assert fast.losses[-1] < fast.losses[0]
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.delta, plain.delta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", [t for t in PARTIAL_CHECKED if t in forward.PARTIAL_TYPES])
def test_bfloat16_upper_layers_follow_the_float32_trajectory(model_type, tiny_tok):
    """v_dtype=bfloat16 rounds only the activations above the edit: the loss falls the same way."""
    model = _model(model_type)
    hp = fast_hparams(model, v_num_grad_steps=12, early_stop_loss=0.0)
    assert hp.v_dtype == "bfloat16"
    module = get_module(model, hp.module_name)
    templates = prompts.context_templates(model, tiny_tok, hp)
    with frozen(model, eval_mode=True):
        low = values.optimise_single_value(model, tiny_tok, module, hp.layer, templates, REQ, 1.0, hp.value_settings())
        exact = values.optimise_single_value(model, tiny_tok, module, hp.layer, templates, REQ, 1.0,
                                             dataclasses.replace(hp.value_settings(), v_dtype="float32"))
    assert low.losses[-1] < low.losses[0]
    torch.testing.assert_close(torch.tensor(low.losses), torch.tensor(exact.losses), rtol=0.05, atol=0.02)
    cosine = torch.nn.functional.cosine_similarity(low.delta, exact.delta, dim=0)
    assert cosine > 0.95  # Adam steps by sign early on: small gradient differences show
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched
    assert (low.upper_dtype, exact.upper_dtype) == (torch.bfloat16, torch.float32)  # what each ran in
    arch = arch_for(model)
    top = get_module(model, arch.layer_tmp.format(hp.layer + 1))
    handle = top.register_forward_hook(lambda _m, _a, out: out)  # hooked layers are run as they are
    try:
        with frozen(model, eval_mode=True):
            hooked = values.optimise_single_value(model, tiny_tok, module, hp.layer, templates, REQ, 1.0,
                                                  hp.value_settings())
    finally:
        handle.remove()
    torch.testing.assert_close(torch.tensor(hooked.losses), torch.tensor(exact.losses), rtol=1e-5, atol=1e-5)
    assert hooked.upper_dtype == torch.float32  # and it says so, though bfloat16 was asked for


def test_low_precision_copies_follow_their_original(tiny_tok):
    """A copy is reused while the weights are unchanged and made anew after an in-place edit."""
    layer = _model("llama").model.layers[1]
    low = lowp.low_precision(layer, torch.bfloat16)
    assert lowp.low_precision(layer, torch.bfloat16) is low
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in low.parameters())
    assert low.self_attn.config._attn_implementation == "eager"
    assert low.self_attn.config is not layer.self_attn.config
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(1.0)
    fresh = lowp.low_precision(layer, torch.bfloat16)
    assert fresh is not low
    torch.testing.assert_close(fresh.mlp.down_proj.weight.float(), layer.mlp.down_proj.weight, rtol=1e-2, atol=1e-2)
    assert lowp.low_precision(layer, torch.float32) is layer
    handle = layer.mlp.register_forward_hook(lambda _m, _a, out: out)  # e.g. an installed GRACE codebook
    try:
        with pytest.raises(ValueError, match="hooks"):
            lowp.low_precision(layer, torch.bfloat16)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="v_dtype must be one of"):
        rome.ROMEHyperParams(layer=0, rewrite_module_tmp="m.{}", v_dtype="int8")


# ------------------------------------------------------------------ hyper-parameters


def test_hparams_defaults_and_overrides(tiny_gpt2, tmp_path):
    hp = rome.ROMEHyperParams.for_model(tiny_gpt2)
    assert hp.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj" and hp.out_proj_transposed
    y = tmp_path / "rome.yaml"
    y.write_text("alg_name: ROME\nv_lr: 0.1\ncontext_template_length_params: [[5, 2]]\n")
    hp2 = hparams_from_overrides(
        rome.ROMEHyperParams, tiny_gpt2, {"layer": "2", "mom2_adjustment": "false", "kl_factor": "1e-2"}, y
    )
    assert (hp2.layer, hp2.mom2_adjustment, hp2.kl_factor, hp2.v_lr) == (2, False, 0.01, 0.1)
    assert hp2.context_template_length_params == ((5, 2),)
    assert hparams_to_dict(hp2)["context_template_length_params"] == [[5, 2]]
    with pytest.raises(ValueError, match=r"unknown ROMEHyperParams field.*v_lrr"):
        hparams_from_overrides(rome.ROMEHyperParams, tiny_gpt2, {"v_lrr": "1"})
    with pytest.raises(ValueError, match="layer must be an integer"):
        hparams_from_overrides(rome.ROMEHyperParams, tiny_gpt2, {"layer": "two"})


EASYEDIT_ROME = """alg_name: "ROME"
model_name: "./hugging_cache/llama-3.2-1b"
stats_dir: "./data/stats"
device: 0
layers: [2]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
"""


def test_an_easyedit_hparams_file_is_taken_as_easyedit_means_it(tiny_gpt2, tmp_path):
    y = tmp_path / "easyedit.yaml"
    y.write_text(EASYEDIT_ROME)
    hp = hparams_from_overrides(rome.ROMEHyperParams, tiny_gpt2, None, y)
    assert (hp.layer, hp.v_num_grad_steps, hp.v_lr, hp.mom2_adjustment) == (2, 25, 0.5, False)
    assert hp.context_template_length_params == ((5, 10), (10, 10)) and hp.mom2_n_samples == 10_000
    for bad, match in (("layers: [1, 2]", "exactly one layer"), ("layers: [99]", "layer"),
                       ("fact_token: last", "subject's last token"), ("archive: ./mend.pt", "pickled")):
        key = bad.split(":")[0] + ":"
        y.write_text("\n".join(line for line in EASYEDIT_ROME.splitlines() if not line.startswith(key)) + f"\n{bad}\n")
        with pytest.raises(ValueError, match=match):
            hparams_from_overrides(rome.ROMEHyperParams, tiny_gpt2, None, y)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("v_lr", 0.0, "v_lr"),
        ("layer", -1, "layer"),
        ("rewrite_module_tmp", "x", "rewrite_module_tmp"),
        ("context_template_length_params", ((0, 3),), "context_template_length_params"),
        ("kl_prompt", "is a", "kl_prompt"),
    ],
)
def test_hparams_validation_names_the_field(tiny_gpt2, field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(rome.ROMEHyperParams.for_model(tiny_gpt2), **{field: value})


def test_layer_out_of_range(tiny_gpt2, tiny_tok):
    hp = dataclasses.replace(fast_hparams(tiny_gpt2), layer=7)
    with pytest.raises(ValueError, match="layer=7 but the model has 3 layers"):
        rome.apply(tiny_gpt2, tiny_tok, [REQ], hp)


def test_registered():
    method = get_method("rome")
    assert method.hparams_cls is rome.ROMEHyperParams and method.apply is rome.apply


def test_factored_left_vector_equals_solve():
    _, c = random_second_moment(16)
    k = torch.randn(16, dtype=torch.float64)
    for ridge in (0.0, 1e-3):
        f = rome_math.factor_second_moment(c, ridge)
        torch.testing.assert_close(rome_math.left_vector(k, c, ridge, factor=f), rome_math.left_vector(k, c, ridge))
    c32 = c.float()
    cache = TensorCache()
    assert rome._factor(cache, c32, 1e-6) is rome._factor(cache, c32, 1e-6)  # kept for the same C
    assert rome._factor(cache, c32.clone(), 1e-6) is not rome._factor(cache, c32, 1e-6)


def test_equal_gain_vector_gives_every_key_the_same_gain_at_least_c_norm():
    _, c = random_second_moment(16)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 16, generator=g, dtype=torch.float64)
    u = rome_math.equal_gain_vector(keys, c, gram_ridge=0.0)
    gains = keys @ u
    torch.testing.assert_close(gains, gains.mean().expand(4))
    # least C-norm among unit-gain directions: uᵀCu ≤ that of u plus anything orthogonal to the keys
    u1 = u / gains[0]
    other = torch.randn(16, generator=g, dtype=torch.float64)
    other -= keys.t() @ torch.linalg.lstsq(keys.t(), other).solution  # now keys @ other = 0
    assert float(u1 @ c @ u1) < float((u1 + 0.1 * other) @ c @ (u1 + 0.1 * other))
    # one key: ROME's u = C⁻¹k*
    torch.testing.assert_close(rome_math.equal_gain_vector(keys[:1], c), rome_math.left_vector(keys[0], c))


def test_equal_gain_gives_the_prompt_the_whole_edit(tiny_llama, tiny_tok):
    hp = fast_hparams(tiny_llama, mom2_adjustment=True, v_num_grad_steps=3)
    d_in = get_module(tiny_llama, hp.module_name).weight.shape[1]
    c = random_second_moment(d_in)[1].float()
    runs = {
        f: rome.apply(
            tiny_llama,
            tiny_tok,
            [REQ],
            dataclasses.replace(hp, prompt_gain_floor=f, escalate_gain_floors=()),
            second_moment=c,
        )
        for f in (0.0, 10.0)
    }
    info_r, info_e = (runs[f].info["requests"][0] for f in (0.0, 10.0))
    assert not info_r["equal_gain"] and info_r["prompt_gain"] == info_r["rome_prompt_gain"]
    assert info_e["equal_gain"] and info_e["prompt_gain"] == pytest.approx(1.0, abs=0.02)
    assert info_e["rome_prompt_gain"] == info_r["rome_prompt_gain"]


def test_an_edit_that_does_not_show_on_its_prompt_raises_the_gain_floor(tiny_llama, tiny_tok):
    """The check runs the edited model: an edit that takes keeps ROME's u; one whose value never
    moved (one step: δ = 0) is tried at every floor, then with v* optimised again."""
    d_in = get_module(tiny_llama, fast_hparams(tiny_llama).module_name).weight.shape[1]
    c = random_second_moment(d_in)[1].float()
    hp = fast_hparams(tiny_llama, mom2_adjustment=True, escalate_gain_floors=(0.5, 1.0))
    req = dataclasses.replace(REQ_DIRECT, target_new="Paris")  # one token: it can become the argmax
    assert token_accuracy(tiny_llama, tiny_tok, [req.text], ["Paris"]) == [0.0]
    took = rome.apply(tiny_llama, tiny_tok, [req], hp, second_moment=c).info["requests"][0]
    assert took["shows_in_generation"] and took["gain_floor"] == 0.0 and not took["equal_gain"]
    stuck = rome.apply(
        tiny_llama, tiny_tok, [req], dataclasses.replace(hp, v_num_grad_steps=1, retry_grad_steps=0), second_moment=c
    ).info["requests"][0]
    assert stuck["shows_in_generation"] is False and stuck["gain_floor"] == 1.0 and not stuck["retried"]
    # with a retry, v* is optimised again with more steps and the edit shows
    retried = rome.apply(
        tiny_llama, tiny_tok, [req], dataclasses.replace(hp, v_num_grad_steps=1), second_moment=c
    ).info["requests"][0]
    assert retried["retried"] and retried["shows_in_generation"] and retried["steps"] > 1
    with pytest.raises(ValueError, match="escalate_gain_floors"):
        dataclasses.replace(hp, escalate_gain_floors=(0.0,))


def test_gains_of_zero_hold_keys_fixed():
    _, c = random_second_moment(16)
    keys = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = rome_math.equal_gain_vector(keys, c, gram_ridge=0.0, gains=torch.tensor([1.0, 0.0, 0.0]))
    gains = keys @ u
    assert gains[0] > 0
    torch.testing.assert_close(gains[1:], torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)


def test_protect_overlap_holds_a_neighbour_that_shares_the_key(tiny_llama, tiny_tok):
    """A neighbour the update would reach keeps its key's output; the edit still shows."""
    d_in = get_module(tiny_llama, fast_hparams(tiny_llama).module_name).weight.shape[1]
    c = random_second_moment(d_in)[1].float()
    req = dataclasses.replace(REQ_DIRECT, target_new="Paris", neighbourhood=("The capital town is France",))
    infos = {
        po: rome.apply(
            tiny_llama,
            tiny_tok,
            [req],
            fast_hparams(tiny_llama, mom2_adjustment=True, protect_overlap=po),
            second_moment=c,
        ).info["requests"][0]
        for po in (0.0, 0.3)
    }
    assert infos[0.0]["neighbour_overlap"][1] > 0.3 and "protected_keys" not in infos[0.0]
    assert infos[0.3]["neighbour_overlap"][1] <= 0.3 and infos[0.3]["protected_keys"] > 0
    assert infos[0.3]["shows_in_generation"]


def test_toward_gain_is_the_least_move_that_gives_the_key_its_share():
    _, c = random_second_moment(16)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 16, generator=g, dtype=torch.float64)
    keys[0] = 0.05 * keys[0] + keys[1:].mean(0)  # a prompt key the mean direction barely reaches
    k_star = keys.mean(0)
    u_r, u_e = rome_math.left_vector(k_star, c), rome_math.equal_gain_vector(keys, c, gram_ridge=0.0)

    def gain(u):
        return float(u @ keys[0]) / float(u @ k_star)

    g_r = gain(u_r)
    floor = (g_r + 1) / 2
    u = rome_math.toward_gain(u_r, u_e, keys[0], k_star, floor)
    assert gain(u) == pytest.approx(floor)
    torch.testing.assert_close(rome_math.toward_gain(u_r, u_e, keys[0], k_star, 5.0), u_e)  # as far as u_e goes


def test_fused_head_in_chunks_equals_log_softmax(monkeypatch, tiny_tok):
    """The one-pass head (running max and sums over vocabulary chunks) gives autograd's loss and gradient."""
    monkeypatch.setattr(forward.FusedHeadLoss, "CHUNK", 37)  # several chunks of a 300-token vocabulary
    torch.manual_seed(4)
    weight = torch.randn(len(tiny_tok), 16)
    hidden = torch.randn(4, 16, requires_grad=True)
    labels = torch.tensor([5, 17, 250])
    label_w = torch.tensor([0.25, 0.25, 0.5])
    kl_init = torch.randn(1, len(tiny_tok)).log_softmax(-1)
    nll, kl = forward.FusedHeadLoss.apply(hidden, weight, labels, label_w, kl_init)
    (g_fused,) = torch.autograd.grad(nll + 0.3 * kl, hidden)
    logp = (hidden @ weight.t()).log_softmax(-1)
    nll_ref = -(logp[:3].gather(1, labels[:, None])[:, 0] * label_w).sum()
    kl_ref = torch.nn.functional.kl_div(kl_init, logp[3:], log_target=True, reduction="batchmean")
    (g_ref,) = torch.autograd.grad(nll_ref + 0.3 * kl_ref, hidden)
    torch.testing.assert_close(nll, nll_ref)
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-5)


def test_neighbour_overlap_flags_a_neighbour_that_shares_the_key(tiny_llama, tiny_tok):
    """A neighbour with the subject's own key gets (u·k)/(u·k*) = 1: the edit moves it fully."""
    same = dataclasses.replace(REQ_DIRECT, neighbourhood=(REQ_DIRECT.text + " again",))
    other = dataclasses.replace(REQ_DIRECT, neighbourhood=("Madrid is in Spain",))
    hp = fast_hparams(tiny_llama, v_num_grad_steps=2, context_template_length_params=(), protect_overlap=0.0)
    ((prompt, shared),) = [rome.apply(tiny_llama, tiny_tok, [same], hp).info["requests"][0]["neighbour_overlap"]]
    _, unrelated = rome.apply(tiny_llama, tiny_tok, [other], hp).info["requests"][0]["neighbour_overlap"]
    assert prompt == same.neighbourhood[0] and shared == pytest.approx(1.0, abs=1e-3) and unrelated < 0.5
    assert "neighbour_overlap" not in rome.apply(tiny_llama, tiny_tok, [REQ_DIRECT], hp).info["requests"][0]
