"""The contract of methods/base.py, checked once for every registered method on every tiny architecture.

One table (`CASES`: method -> the quickest settings that run its whole pipeline) runs through the
same checks (as peft's tests/test_custom_models.py). The tester gives `apply` what the method's
declared capabilities ask for, as the engine does (kedit/edit/run.py): random second moments for
`stats`, no earlier memories for `memory`, and for `editor` an editor the method's own `train`
made in a step or two. It checks that `train` and `apply` leave the model's weights, gradient flags
and training mode as they found them; that every delta names a parameter of the model and has its
shape; that adapters come from methods declaring them and have an installer, name a module of the
model and carry a JSON config; that hyper-parameters survive to-dict / from-dict through JSON; and
that a repository over the same model commits the result with the hashes of the engine's arithmetic,
materialises it checked against them, and reverts it to the base bit for bit.

A registered method without a row fails `test_every_registered_method_has_a_row`; the third-party
method of tests/methods/plugin (declared by its own distribution's entry point, put on `sys.path`
here) has its row like any built-in. Nothing is scored here: the methods' own tests check what the
edits do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kedit.methods.base import Adapter, EditRequest, Method, TrainItem, get_method, method_names
from kedit.methods.hparams import hparams_from_dict, hparams_to_dict

from kedit.core.delta import apply_step
from kedit.core.repo import Repository, encode_delta
from kedit.core.tensors import hash_tensor
from kedit.model.adapters import installer
from kedit.model.arch import get_module
from tests.tiny import MODEL_TYPES, make_model

PLUGIN = Path(__file__).resolve().parent / "plugin"  # a distribution's dist-info and its method's module

REQUESTS = [
    EditRequest(prompt="The capital city is France", subject="France", target_new="Japan",
                neighbourhood=("The capital city is Italy",), locality=(("London, Rome, Paris,", "Tokyo"),)),
    EditRequest(prompt="{} is the capital of", subject="Berlin", target_new="Spain"),
]
TRAINING = [TrainItem(EditRequest(prompt=f"{{}} {verb}", subject=subject, target_new=target,
                                  paraphrases=(f"They say {subject} {verb}",),
                                  locality=(("London, Rome, Paris,", "Tokyo"),)))
            for verb, subject, target in [("is in", "Madrid", "Japan"), ("is in", "Tokyo", "Spain"),
                                          ("speaks", "Danielle Darrieux", "English"), ("plays the", "Toko Yasuda",
                                                                                      "piano"),
                                          ("is the capital of", "Berlin", "Italy"), ("is in", "Rome", "France")]]

_TEMPLATES = {"context_template_length_params": ((2, 1),)}
_ONE_STEP = {"rank": 4, "max_steps": 1, "val_every": 1, "batch_size": 2, "n_paraphrases": 1}

# method -> {"hparams": changes for speed, "train": training changes for speed (methods with an editor)}
CASES: dict[str, dict[str, dict[str, Any]]] = {
    "rome": {"hparams": {**_TEMPLATES, "v_num_grad_steps": 2, "retry_grad_steps": 0, "escalate_gain_floors": ()}},
    "memit": {"hparams": {**_TEMPLATES, "v_num_grad_steps": 2}},
    "alphaedit": {"hparams": {**_TEMPLATES, "v_num_grad_steps": 2}},
    "ft": {"hparams": {"num_steps": 2}},
    "grace": {"hparams": {"n_iter": 2}},
    "mend": {"train": _ONE_STEP},
    "instructedit": {"train": _ONE_STEP},
    "tiny-logit": {},  # tests/methods/plugin: a third party's
}

# What the engine passes `apply` for each capability that adds a keyword (kedit/edit/run.py).
KEYWORDS = {"stats": "stats_provider", "memory": "memory", "editor": "load_editor_fn"}


@pytest.fixture(scope="module", autouse=True)
def third_party_distribution():
    """The plugin's distribution installed as far as importlib.metadata can tell: on sys.path."""
    sys.path.insert(0, str(PLUGIN))
    yield
    sys.path.remove(str(PLUGIN))


def test_every_registered_method_has_a_row():
    missing = sorted(set(method_names()) - set(CASES))
    assert not missing, f"add a row to CASES for each registered method: {missing}"
    assert not sorted(set(CASES) - set(method_names())), "CASES has rows for methods nobody registers"


def random_stats(model: Any) -> Callable[[str, int], torch.Tensor]:
    """A stats provider: a random positive-definite E[kkᵀ] of each module's input width, whose
    spectrum falls from 1 to 1e-6 as real keys' does (AlphaEdit's null space is its low end)."""

    def provider(name: str, layer: int) -> torch.Tensor:
        module = get_module(model, name)
        d = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
        g = torch.Generator().manual_seed(layer)
        k = torch.randn(4 * d, d, generator=g) * torch.logspace(0, -3, d)
        return k.t() @ k / (4 * d)

    return provider


def _fingerprint(model: Any) -> tuple[str, list[bool], bool]:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), [p.requires_grad for p in model.parameters()], model.training


def engine_inputs(method: Method, model: Any, tok: Any) -> tuple[Any, dict[str, Any]]:
    """(hyper-parameters, apply's keywords) as the engine makes them from the declared capabilities."""
    case = CASES[method.name]
    hp = dataclasses.replace(method.hparams_cls.for_model(model), **case.get("hparams", {}))
    kwargs: dict[str, Any] = {}
    if method.has("stats"):
        kwargs["stats_provider"] = random_stats(model)
    if method.has("memory"):
        kwargs["memory"] = []
    if method.has("editor"):
        params = dataclasses.replace(method.train_hparams_cls.for_model(model), **case["train"])
        before = _fingerprint(model)
        trained = method.train(model, tok, TRAINING[:4], TRAINING[4:], params)
        assert _fingerprint(model) == before, f"{method.name}'s train changed the model"
        assert trained.state and all(torch.isfinite(t).all() for t in trained.state.values())
        stored = ({k: v.clone() for k, v in trained.state.items()},  # as kedit.edit.trained stores and loads it
                  {"method": method.name, "config": json.loads(json.dumps(trained.config))})
        hp = dataclasses.replace(hp, editor="0" * 64)
        kwargs["load_editor_fn"] = lambda _id: stored
    return hp, kwargs


@pytest.fixture(scope="module", params=MODEL_TYPES)
def arch(request, tiny_tok, tmp_path_factory) -> tuple[Any, Path]:
    """(the tiny model, a folder of it that repositories start from)."""
    model = make_model(request.param, len(tiny_tok))
    folder = tmp_path_factory.mktemp(f"contract-{request.param}")
    model.save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_declared_capabilities_match_what_apply_takes(name):
    """The engine passes keywords by declaration alone: one the method takes but does not declare
    would never be passed, one it declares but does not take would fail every edit."""
    method = get_method(name)
    params = inspect.signature(method.apply).parameters
    for capability, keyword in KEYWORDS.items():
        assert method.has(capability) == (keyword in params), f"{name}: {capability!r} vs apply's {keyword!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_keeps_the_model_and_its_result_commits_materialises_and_reverts(name, arch, tiny_tok, tmp_path):
    model, folder = arch
    method = get_method(name)
    hp, kwargs = engine_inputs(method, model, tiny_tok)
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
    assert bool(result.adapters) == method.has("adapters"), f"{name}: adapters returned vs declared"
    assert not result.memory or method.has("memory"), f"{name} keeps memory without declaring 'memory'"
    modules = dict(model.named_modules())
    for adapter in result.adapters:
        assert isinstance(adapter, Adapter)
        assert installer(adapter.kind) is not None
        assert adapter.config.get("module") in modules
        json.dumps(adapter.config)
        assert all(isinstance(t, torch.Tensor) for t in adapter.tensors.values())
    json.dumps(result.info)

    # Committed: each tensor's recorded hash is the model's weight plus the delta by the engine's
    # arithmetic, and materialising (which checks every tensor against its hash) gives it back.
    repo = Repository.init(tmp_path / "work", str(folder), progress=False)
    base = repo.head()
    commit = repo.commit(result.deltas, adapters=result.adapters, method=name, hparams=hparams_to_dict(hp),
                         requests=[r.to_dict() for r in REQUESTS], memory=result.memory or None)
    recorded = {c.name: c.result_hash for c in repo.changes(commit.id)}
    assert set(recorded) == set(result.deltas)
    for key, delta in result.deltas.items():
        before = params[key].detach().cpu()
        assert recorded[key] == hash_tensor(apply_step(before, encode_delta(delta, before)[0]))
    assert {k: hash_tensor(v) for k, v in repo.materialize(commit.id, names=list(recorded)).items()} == recorded
    assert len(repo.adapters(commit.id)) == len(result.adapters)

    # Reverted: the base, bit for bit, with no adapter and no memory of the edit left.
    reverted = repo.revert(commit.id)
    hashes = {rev: {n: e.hash for n, e in repo.manifest(rev).items()} for rev in (reverted.id, base)}
    assert hashes[reverted.id] == hashes[base]
    assert not repo.adapters(reverted.id) and not repo.memory(name, reverted.id)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hyperparameters_round_trip_through_json(name, tiny_tok):
    model = make_model("llama", len(tiny_tok))
    method = get_method(name)
    for cls, changes in ((method.hparams_cls, CASES[name].get("hparams", {})),
                         (method.train_hparams_cls, CASES[name].get("train", {}))):
        if cls is None:
            continue
        hp = dataclasses.replace(cls.for_model(model), **changes)
        stored = json.loads(json.dumps(hparams_to_dict(hp)))
        assert hparams_from_dict(cls, cls.for_model(model), stored) == hp
