"""GRACE on tiny models: the radius test, the split/expand rules, replay after revert, per-architecture edits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kedit.methods import grace
from kedit.methods.base import Adapter, EditRequest, get_method

from kedit.eval import metrics
from kedit.model.adapters import install_adapters
from tests.tiny import MODEL_TYPES, make_model

# The subject ends the prompt and the targets are single tokens of the tiny tokenizer (tests/test_cli_edit.py).
FRANCE = EditRequest("The capital city is France", "France", "Japan")
BERLIN = EditRequest("Berlin is the capital of", "Berlin", "Paris")


def rec(key: list[float], label: tuple[int, ...], value: float = 0.0, eps: float = 1.0) -> grace.Record:
    return grace.Record(torch.tensor(key), torch.full((2,), value), label, eps, 1e-4)


def hand_adapter(module: str, keys: torch.Tensor, values: torch.Tensor, eps: float) -> Adapter:
    """An adapter in the stored format, written by hand (one record per key, label = its index)."""
    n = keys.shape[0]
    tensors = {"keys": keys.float(), "values": values.float(), "label_ids": torch.arange(n, dtype=torch.int64),
               "label_lengths": torch.ones(n, dtype=torch.int64)}
    return Adapter("grace", tensors, {"format": 1, "module": module, "eps_init": eps, "duplicate_tol": 1e-4})


def module_io(model, tok, module_name: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input and output at the prompt's last position."""
    seen = {}
    handle = model.get_submodule(module_name).register_forward_hook(
        lambda m, a, o: seen.update(x=a[0][0, -1].detach().clone(), y=o[0, -1].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([metrics.prompt_ids(tok, text)]))
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def test_keys_inside_the_radius_are_replaced_and_outside_are_not(tiny_llama, tiny_tok) -> None:
    hp = grace.GRACEHyperParams.for_model(tiny_llama)
    x, y = module_io(tiny_llama, tiny_tok, hp.module_name, FRANCE.text)
    direction = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    value = torch.full_like(y, 7.0)
    try:
        for offset, inside in ((0.0, True), (0.6, True), (0.99, True), (1.01, False), (3.0, False)):
            key = x + offset * direction
            install_adapters(tiny_llama, [hand_adapter(hp.module_name, key[None], value[None], eps=1.0)])
            _, out = module_io(tiny_llama, tiny_tok, hp.module_name, FRANCE.text)
            expected = value if inside else y
            assert torch.allclose(out, expected, atol=1e-5), (offset, inside)
    finally:
        install_adapters(tiny_llama, [])
    _, out = module_io(tiny_llama, tiny_tok, hp.module_name, FRANCE.text)
    assert torch.equal(out, y)  # uninstalled: the model is its own again
    assert grace.codebook_of(tiny_llama, hp.module_name) is None


def test_rules_add_split_expand_reuse_supersede() -> None:
    book = grace.Codebook(2, 2)
    assert book.place(rec([0, 0], (1,))).action == "add"
    assert book.place(rec([5, 0], (2,))).action == "add"  # 5 > eps_init + eps_nearest: a new entry
    split = book.place(rec([0, 1.5], (3,)))  # within 1 + 1 of the first key, another label
    assert split.action == "split" and len(book) == 3
    assert book.radii.tolist()[:3] == pytest.approx([0.75 - grace.SPLIT_MARGIN, 1.0, 0.75])
    expand = book.place(rec([6.8, 0], (2,), value=4.0))  # same label as [5, 0], 1.8 away: coverage
    assert (expand.action, expand.slot, len(book)) == ("expand", 1, 3)
    assert float(book.radii[1]) == pytest.approx(1.8 + grace.COVER_MARGIN) and book.values[1].tolist() == [4.0, 4.0]
    assert book.nearest(torch.tensor([6.8 + grace.COVER_MARGIN / 2, 0]))[1] <= float(book.radii[1])  # the key is inside
    reuse = book.place(rec([5.5, 0], (2,), value=5.0))  # inside the expanded radius: the value trains on
    assert (reuse.action, float(book.radii[1])) == ("reuse", pytest.approx(1.8 + grace.COVER_MARGIN))
    again = book.place(rec([0, 0], (9,), value=9.0))  # the same key re-edited with a new target
    assert (again.action, again.slot, book.labels[0]) == ("supersede", 0, (9,))
    assert float(book.radii[0]) == pytest.approx(0.75 - grace.SPLIT_MARGIN)


def test_replay_without_a_record_is_the_codebook_it_never_touched() -> None:
    a, b, c = rec([0, 0], (1,), 1.0), rec([0, 1.5], (2,), 2.0), rec([9, 9], (3,), 3.0)
    both = grace.replay([a, b, c], 2, 2)
    assert both.radii[:3].tolist() == pytest.approx([0.75 - grace.SPLIT_MARGIN, 0.75, 1.0])
    without_a = grace.replay([b, c], 2, 2)  # revert a: b is an ordinary entry with radius eps_init
    assert without_a.radii[:2].tolist() == [1.0, 1.0] and without_a.labels == [(2,), (3,)]
    without_b = grace.replay([a, c], 2, 2)  # revert b: a's radius is whole again
    assert without_b.radii[:2].tolist() == [1.0, 1.0] and without_b.values[0].tolist() == [1.0, 1.0]


def test_edit_sees_the_installed_codebook_and_leaves_it_as_found(tiny_llama, tiny_tok) -> None:
    method = get_method("grace")
    hp = dataclasses.replace(grace.GRACEHyperParams.for_model(tiny_llama), eps_init=50.0)
    first = method.apply(tiny_llama, tiny_tok, [FRANCE], hp)
    assert grace.codebook_of(tiny_llama, hp.module_name) is None  # the model was left as found
    (adapter,) = first.adapters
    assert adapter.kind == "grace" and adapter.tensors["keys"].shape[0] == 1 and not first.deltas
    assert adapter.config["entries"][0]["action"] == "add"
    try:
        install_adapters(tiny_llama, first.adapters)
        second = method.apply(tiny_llama, tiny_tok, [BERLIN], hp)  # a radius of 50 covers it: the rules apply
        assert second.adapters[0].config["entries"][0]["action"] == "split"
        assert len(grace.records_of(tiny_llama, hp.module_name)) == 1  # still only the first commit's
        install_adapters(tiny_llama, first.adapters + second.adapters)  # incremental: the first is kept
        book = grace.codebook_of(tiny_llama, hp.module_name)
        assert len(book) == 2 and book.radii[0] < 50 and book.radii[1] < 50
        shown = metrics.shows_in_generation(tiny_llama, tiny_tok, [FRANCE.text, BERLIN.text], ["Japan", "Paris"], 2)
        assert shown == [True, True]
        install_adapters(tiny_llama, second.adapters)  # without the first: as if it had never been made
        assert grace.codebook_of(tiny_llama, hp.module_name).radii[0] == 50.0
    finally:
        install_adapters(tiny_llama, [])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_edit_takes_on_every_architecture(model_type: str, tiny_tok) -> None:
    model = make_model(model_type, len(tiny_tok))
    hp = grace.GRACEHyperParams.for_model(model)
    unrelated = [("Tokyo is in", "Japan"), ("Madrid is in", "Spain")]
    reference = metrics.locality_reference(model, tiny_tok, unrelated)
    result = get_method("grace").apply(model, tiny_tok, [FRANCE], hp)
    install_adapters(model, result.adapters)
    try:
        assert metrics.shows_in_generation(model, tiny_tok, [FRANCE.text], ["Japan"], 2) == [True]
        assert metrics.reliability(model, tiny_tok, [FRANCE]).value == 1.0  # teacher forcing agrees
        assert metrics.locality(model, tiny_tok, unrelated, reference).value == 1.0
    finally:
        install_adapters(model, [])


def test_bad_hyper_parameters_are_refused(tiny_llama) -> None:
    hp = grace.GRACEHyperParams.for_model(tiny_llama)
    for field, value in (("eps_init", 0.0), ("n_iter", 0), ("val_init", "hot"), ("module_tmp", "model.norm")):
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(hp, **{field: value})


def test_an_adapter_kind_nobody_installs_is_a_clear_error(tiny_llama) -> None:
    from kedit.core.errors import KeditError

    with pytest.raises(KeditError, match="no installer for adapter kind 'wise'"):
        install_adapters(tiny_llama, [Adapter("wise", {"x": torch.zeros(1)}, {})])


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_partial_forward_trains_the_same_value_as_the_full_model(model_type: str, tiny_tok) -> None:
    model = make_model(model_type, len(tiny_tok))
    hp = dataclasses.replace(grace.GRACEHyperParams.for_model(model), n_iter=8, early_stop_loss=0.0)
    request = EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano")  # a four-token target
    fast = get_method("grace").apply(model, tiny_tok, [request], hp).adapters[0]
    full = get_method("grace").apply(model, tiny_tok, [request], dataclasses.replace(hp, partial_forward=False))
    assert torch.allclose(fast.tensors["values"], full.adapters[0].tensors["values"], atol=1e-4)
    assert fast.config["entries"][0]["loss"] == pytest.approx(full.adapters[0].config["entries"][0]["loss"], rel=1e-4)
