"""FT-L: fine-tuning one MLP projection inside an L∞ ball around its original weights."""

import dataclasses

import torch
from kedit.methods import ft
from kedit.methods.base import Dense, EditRequest

from kedit.core.delta import apply_step
from kedit.eval.metrics import teacher_forced

REQS = [
    EditRequest(prompt="The capital city is France", subject="France", target_new="Japan"),
    EditRequest(prompt="The capital of Spain is Tokyo", subject="Tokyo", target_new="Paris"),
]


def accuracy(model, tok):
    return [r.accuracy for r in teacher_forced(model, tok, [q.text for q in REQS], [q.target_new for q in REQS])]


def test_ft_learns_the_targets_and_leaves_the_model_alone(tiny_llama, tiny_tok):
    hp = dataclasses.replace(ft.FTHyperParams.for_model(tiny_llama), lr=5e-2, num_steps=60, norm_constraint=0.0)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    result = ft.apply(tiny_llama, tiny_tok, REQS, hp)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert all(p.requires_grad for p in tiny_llama.parameters())  # flags restored
    assert result.info["loss"][-1] < result.info["loss"][0]
    (name, delta), = result.deltas.items()
    assert isinstance(delta, Dense) and name == hp.rewrite_module_tmp.format(hp.layers[0]) + ".weight"
    assert accuracy(tiny_llama, tiny_tok) != [1.0, 1.0]
    params = dict(tiny_llama.named_parameters())
    with torch.no_grad():
        params[name].copy_(apply_step(before[name], delta))
    try:
        assert accuracy(tiny_llama, tiny_tok) == [1.0, 1.0]
    finally:
        tiny_llama.load_state_dict(before)


def test_norm_constraint_bounds_every_weight(tiny_gpt2, tiny_tok):
    hp = dataclasses.replace(ft.FTHyperParams.for_model(tiny_gpt2), lr=1e-2, num_steps=5, norm_constraint=1e-3)
    result = ft.apply(tiny_gpt2, tiny_tok, REQS, hp)
    (delta,) = result.deltas.values()
    assert 0 < float(delta.delta.abs().max()) <= 1e-3 + 1e-7
