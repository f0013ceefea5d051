"""The contract of methods/base.py, checked once for every registered method on every tiny architecture.

One table (`CASES`: method -> quick hyper-parameters and the extras its `apply` needs) runs through
the same checks (as peft's tests/test_custom_models.py): `apply` leaves the model's weights,
gradient flags and training mode as it found them; every delta names a parameter of the model
and has its shape; adapters are of a kind with an installer, name a module of the model and carry
a JSON config; hyper-parameters survive to-dict / from-dict through JSON. A registered built-in
method without a row fails `test_every_registered_method_has_a_row`.

Settings are the smallest that run each method's whole pipeline (one or two optimisation steps);
statistics are random second moments and MEND's editor is the untrained one (the identity), so
nothing is scored here: the methods' own tests check what the edits do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kedit.methods import mend_net
from kedit.methods.base import BUILTIN_MODULES, Adapter, EditRequest, get_method
from kedit.methods.hparams import hparams_from_dict, hparams_to_dict

from kedit.model.adapters import installer
from kedit.model.arch import get_module
from tests.tiny import MODEL_TYPES, make_model

REQUESTS = [
    EditRequest(prompt="The capital city is France", subject="France", target_new="Japan",
                neighbourhood=("The capital city is Italy",), locality=(("London, Rome, Paris,", "Tokyo"),)),
    EditRequest(prompt="{} is the capital of", subject="Berlin", target_new="Spain"),
]


def random_stats(model: Any) -> Callable[[str, int], torch.Tensor]:
    """A stats provider: a random positive-definite E[kkᵀ] of each module's input width."""

    def provider(name: str, layer: int) -> torch.Tensor:
        module = get_module(model, name)
        d = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
        g = torch.Generator().manual_seed(layer)
        k = torch.randn(4 * d, d, generator=g)
        return k.t() @ k / (4 * d)

    return provider


def untrained_editor(method: str) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    """(hparams changes, apply kwargs) for a trained-editor method: an identity editor, stored as the engine would."""

    def extras(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        params = dataclasses.replace(mend_net.MENDTrainParams.for_model(model), rank=4, edit_lr=0.01)
        editor = mend_net.build_editor(params, mend_net.module_shapes(model, params))
        config = {"shapes": [list(s) for s in editor.shapes], "params": hparams_to_dict(params)}
        tensors = {k: v.clone() for k, v in editor.state_dict().items()}
        stored = (tensors, {"method": method, "config": json.dumps(config)})
        return {"editor": "0" * 64}, {"load_editor_fn": lambda _id: stored}

    return extras


def with_stats(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return {}, {"stats_provider": random_stats(model)}


def nothing(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return {}, {}


_TEMPLATES = {"context_template_length_params": ((2, 1),)}

# method -> (hyper-parameter changes for speed, extras(model) -> (hyper-parameter changes, apply kwargs))
CASES: dict[str, tuple[dict[str, Any], Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]]] = {
    "rome": ({**_TEMPLATES, "v_num_grad_steps": 2, "retry_grad_steps": 0, "escalate_gain_floors": ()}, with_stats),
    "memit": ({**_TEMPLATES, "v_num_grad_steps": 2}, with_stats),
    "alphaedit": ({**_TEMPLATES, "v_num_grad_steps": 2}, with_stats),
    "ft": ({"num_steps": 2}, nothing),
    "grace": ({"n_iter": 2}, nothing),
    "mend": ({}, untrained_editor("mend")),
    "instructedit": ({}, untrained_editor("instructedit")),
}


def test_every_registered_method_has_a_row():
    assert set(BUILTIN_MODULES) == set(CASES), "add a row to CASES for each built-in method"


def _fingerprint(model: Any) -> tuple[str, list[bool], bool]:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), [p.requires_grad for p in model.parameters()], model.training


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model(request, tiny_tok):
    return make_model(request.param, len(tiny_tok))


@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_keeps_the_model_and_returns_deltas_of_its_parameters(name, model, tiny_tok):
    method = get_method(name)
    speed, extras = CASES[name]
    changes, kwargs = extras(model)
    hp = dataclasses.replace(method.hparams_cls.for_model(model), **speed, **changes)
    before = _fingerprint(model)
    torch.manual_seed(0)
    result = method.apply(model, tiny_tok, REQUESTS, hp, **kwargs)
    assert _fingerprint(model) == before  # weights, gradient flags and (eval) mode

    params = dict(model.named_parameters())
    assert result.deltas or result.adapters
    for key, delta in result.deltas.items():
        assert key in params, f"{name} returned a delta for {key}, not a parameter of the model"
        assert tuple(delta.shape) == tuple(params[key].shape)
        tensors = [getattr(delta, f.name) for f in dataclasses.fields(delta)]
        assert all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor))
    modules = dict(model.named_modules())
    for adapter in result.adapters:
        assert isinstance(adapter, Adapter)
        assert installer(adapter.kind) is not None
        assert adapter.config.get("module") in modules
        json.dumps(adapter.config)
        assert all(isinstance(t, torch.Tensor) for t in adapter.tensors.values())
    json.dumps(result.info)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hyperparameters_round_trip_through_json(name, tiny_tok):
    model = make_model("llama", len(tiny_tok))
    method = get_method(name)
    for cls in (method.hparams_cls, method.train_hparams_cls):
        if cls is None:
            continue
        hp = dataclasses.replace(cls.for_model(model), **{k: v for k, v in CASES[name][0].items()
                                                          if k in cls.__dataclass_fields__})
        stored = json.loads(json.dumps(hparams_to_dict(hp)))
        assert hparams_from_dict(cls, cls.for_model(model), stored) == hp
