"""MEND on tiny models: the editor starts as the identity, an edit is a sum of rank-one terms,
a training step lowers the loss, and the cached-layer forward equals the full one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kedit.methods import mend_net, mend_train
from kedit.methods.base import EditRequest, TrainItem

from kedit.model.arch import get_module
from tests.tiny import MODEL_TYPES, make_model

FACTS = [
    ("The capital city is {}", "France", "Japan", "Paris"),
    ("The language of {} is", "Japan", "French", "Japanese"),
    ("{} is the capital of", "Berlin", "Spain", "Germany"),
    ("{} is in", "Madrid", "Japan", "Spain"),
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("{} makes the", "Apple", "guitar", "iPhone"),
]


def _requests() -> list[EditRequest]:
    return [EditRequest(prompt=t, subject=s, target_new=new, target_true=true,
                        paraphrases=(t.replace("{}", s) + " the",),
                        locality=(("London, Rome, Paris, Tokyo,", "Berlin"),)) for t, s, new, true in FACTS]


def _params(model, **kw) -> mend_net.MENDTrainParams:
    return dataclasses.replace(mend_net.MENDTrainParams.for_model(model), rank=8, **kw)


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_tok):
    return make_model(request.param, len(tiny_tok), seed=3)


def test_editor_starts_as_identity_and_first_update_is_minus_lr_times_gradient(model, tiny_tok):
    params = _params(model, edit_lr=0.05)
    editor = mend_net.build_editor(params, mend_net.module_shapes(model, params))
    reqs = _requests()[:2]
    rows = mend_net.edit_rows(tiny_tok, [r.text for r in reqs], [r.target_new for r in reqs])
    factors, _ = mend_net.capture_factors(model, params, rows)
    for i, (u, d) in enumerate(zip(factors.u, factors.d, strict=True)):
        editor.observe(i, torch.cat([u, d], -1))  # non-trivial statistics: still the identity
        ut, dt = editor(i, u, d)
        torch.testing.assert_close(ut, u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dt, d, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        deltas = mend_net.editor_deltas(params, mend_net.transform(editor, factors), editor.step)
    # the gradient of the same loss, taken by autograd on the weights themselves
    weights = [get_module(model, m).weight for m in params.modules]
    logits = model(input_ids=rows.ids, attention_mask=rows.mask).logits[rows.rows, rows.cols]
    loss = mend_net.edit_loss(logits, rows.labels, rows.rows, rows.ids.shape[0])
    grads = torch.autograd.grad(loss, weights)
    model.zero_grad(set_to_none=True)
    for name, g in zip(params.modules, grads, strict=True):
        d = deltas[name + ".weight"]
        torch.testing.assert_close(d.a @ d.b, -0.05 * g, rtol=1e-4, atol=1e-7)


def test_delta_is_the_sum_of_rank_one_terms_and_matches_the_hooks(model, tiny_tok):
    params = _params(model, edit_lr=0.05)
    editor = mend_net.build_editor(params, mend_net.module_shapes(model, params))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking editor: non-zero U so it is not the identity
        for p in editor.editor_parameters():
            p.add_(0.05 * torch.randn_like(p))
    reqs = _requests()[:3]
    rows = mend_net.edit_rows(tiny_tok, [r.text for r in reqs], [r.target_new for r in reqs])
    factors, _ = mend_net.capture_factors(model, params, rows)
    with torch.no_grad():
        edited = mend_net.transform(editor, factors)
        deltas = mend_net.editor_deltas(params, edited, editor.step)
    for i, name in enumerate(params.modules):
        d = deltas[name + ".weight"]
        n_tokens = factors.u[i].shape[0]
        assert d.rank == n_tokens and 0 < n_tokens <= int(rows.mask.sum())  # one term per token with a gradient
        terms = sum(torch.outer(edited.d[i][t], edited.u[i][t]) for t in range(n_tokens))  # Σ δ̃ ũᵀ
        expected = -float(editor.step[i].detach()) * (terms.t() if params.transposed else terms)
        torch.testing.assert_close(d.a @ d.b, expected, rtol=1e-5, atol=1e-6)
    # the training forward (hooks) sees the same model as the committed weights
    probe = model(input_ids=rows.ids, attention_mask=rows.mask).logits
    with torch.no_grad(), mend_net.delta_hooks(model, params, edited, editor.step):
        hooked = model(input_ids=rows.ids, attention_mask=rows.mask).logits
    state = dict(model.named_parameters())
    saved = {n: state[n].detach().clone() for n in deltas}
    with torch.no_grad():
        for n, d in deltas.items():
            state[n].add_(d.a @ d.b)
        committed = model(input_ids=rows.ids, attention_mask=rows.mask).logits
        for n in deltas:
            state[n].copy_(saved[n])
    torch.testing.assert_close(hooked, committed, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked, probe)


def test_welford_statistics_match_the_batch_formulas():
    editor = mend_net.MENDEditor([(3, 2)], rank=2, n_hidden=1, edit_lr=1e-3)
    x = torch.randn(50, 5, dtype=torch.float64) * 3 + 1
    for chunk in x.split([7, 1, 30, 12]):
        editor.observe(0, chunk)
    mean, std = editor.stats(0)
    torch.testing.assert_close(mean, x.mean(0).float())
    torch.testing.assert_close(std, x.std(0).float())


@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_forward_from_a_cached_layer_input_equals_the_full_forward(arch, tiny_tok):
    model = make_model(arch, len(tiny_tok), seed=1)
    reqs = _requests()
    rows = mend_net.edit_rows(tiny_tok, [r.text for r in reqs], [r.target_new for r in reqs])
    top = mend_train.TopForward(model, 1)
    full = model.base_model(input_ids=rows.ids, attention_mask=rows.mask)[0]
    with torch.no_grad():
        got = top(rows)
        again = top(rows)  # now entirely from the cache
    real = rows.mask.bool()
    torch.testing.assert_close(got[real], full[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got)
    assert top.enabled == (arch not in ("gpt2", "gemma"))


def test_one_training_step_lowers_the_edit_loss(tiny_tok):
    model = make_model("llama", len(tiny_tok), seed=3)
    params = _params(model, edit_lr=0.01, lr=1e-3, lr_lr=1e-2, batch_size=4)
    items = [TrainItem(r) for r in _requests()]
    editor = mend_net.build_editor(params, mend_net.module_shapes(model, params))
    opt = torch.optim.Adam(editor.editor_parameters(), lr=params.lr)
    opt_lr = torch.optim.Adam([editor.step], lr=params.lr_lr)
    prepared = mend_train._prepare(tiny_tok, items, params)
    forward = mend_train.TopForward(model, min(params.layers))
    batch = [(p, p.prompts[0]) for p in prepared[:4]]
    before = mend_train.run_batch(model, tiny_tok, editor, params, forward, batch, train=True)
    before.loss.backward()
    opt.step()
    opt_lr.step()
    after = mend_train.run_batch(model, tiny_tok, editor, params, forward, batch, train=False)
    assert float(after.loss) < float(before.loss.detach())
    assert after.edit_nll < before.edit_nll


class _MemoryCheckpoint:
    """A checkpoint kept in memory (the engine's is a safetensors file: tests/test_cli_editors.py)."""

    def __init__(self) -> None:
        self.saved = None

    def load(self):
        return self.saved

    def save(self, tensors, state):
        import json

        self.saved = ({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(state)))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_tok):
    model = make_model("llama", len(tiny_tok), seed=3)
    items = [TrainItem(r) for r in _requests()]
    params = _params(model, batch_size=2, val_every=2, lr=1e-3)
    whole = _MemoryCheckpoint()
    straight = mend_train.train(model, tiny_tok, items[:4], items[4:], dataclasses.replace(params, max_steps=5),
                                checkpoint=whole)
    ckpt = _MemoryCheckpoint()
    mend_train.train(model, tiny_tok, items[:4], items[4:], dataclasses.replace(params, max_steps=3),
                     checkpoint=ckpt)
    assert ckpt.saved[1]["step"] == 3
    resumed = mend_train.train(model, tiny_tok, items[:4], items[4:], dataclasses.replace(params, max_steps=5),
                               checkpoint=ckpt)
    assert resumed.metrics["steps"] == straight.metrics["steps"] == 5
    assert [h["step"] for h in resumed.history] == [2, 3, 4, 5]  # the first run validated where it stopped
    # validation does not touch the editor: the weights after step 5 are those of the uninterrupted run
    current = {k: v for k, v in whole.saved[0].items() if k.startswith(("editor.", "opt.", "optlr."))}
    assert current
    for name, value in current.items():
        torch.testing.assert_close(ckpt.saved[0][name], value, rtol=1e-5, atol=1e-7)
