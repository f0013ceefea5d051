"""The method registry: names to methods, each with the capabilities it declares.

A method's module calls `register_method` when imported (peft's `register_peft_method`). What
the method needs from kedit is declared, not guessed: in its `kedit.methods` entry point's extras
(kedit/core/plugins.py, where `CAPABILITIES` says what each word means), or, for a method made
in-process without a distribution, as `register_method(..., capabilities=...)`.

Calling sequence:
    method_names("editor")        # names only, from metadata: imports no method and not torch
    method = get_method("mend")   # imports the declaring module on first use
    method.has("stats")           # what the engine must pass to `apply` or do with the result

Error handling: a bad registration (unknown capability, a capability without what it requires,
a name taken, a declaration that contradicts the entry point) raises ValueError when the module
registers; an unknown name raises MethodNotFoundError (a KeyError) listing the known ones.

This module imports only the standard library and kedit.core's metadata reader, so the command
line can offer the method names without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kedit.core.errors import KeditError, MethodNotFoundError
from kedit.core.plugins import CAPABILITIES, declared_methods

__all__ = ["CAPABILITIES", "Method", "get_method", "method_names", "register_method"]

ApplyFn = Callable[..., Any]  # (model, tokenizer, requests, hparams, **what its capabilities give) -> EditResult


@dataclass(frozen=True)
class Method:
    name: str
    hparams_cls: type
    apply: ApplyFn
    capabilities: frozenset[str] = frozenset()
    train: Callable[..., Any] | None = None  # "editor": builds the editor `apply` uses (kedit train-editor)
    train_hparams_cls: type | None = None  # "editor": the training hyper-parameters, stored with the editor

    def has(self, capability: str) -> bool:
        if capability not in CAPABILITIES:  # a typo here would silently read as "no"
            raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        return capability in self.capabilities


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, hparams_cls: type, apply: ApplyFn, *, capabilities: Iterable[str] | None = None,
                    train: Callable[..., Any] | None = None, train_hparams_cls: type | None = None) -> Method:
    """Register a method under a lower-case name; a second registration of a name is an error.

    `capabilities` None: those its `kedit.methods` entry point declares (none without one); given
    while an entry point declares the name too, the two must agree."""
    if name != name.lower() or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method names are lower-case letters, digits, '-' and '_': {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a method named {name!r} is already registered")
    declared = declared_methods().get(name)
    if capabilities is None:
        caps = declared.capabilities if declared is not None else frozenset()
    else:
        caps = frozenset(capabilities)
        if declared is not None and declared.capabilities != caps:
            raise ValueError(f"method {name!r}: registered with capabilities {sorted(caps)}, but the entry point "
                             f"of {declared.distribution} declares {sorted(declared.capabilities)}")
    _check(name, caps, hparams_cls, train, train_hparams_cls)
    method = Method(name, hparams_cls, apply, caps, train, train_hparams_cls)
    _REGISTRY[name] = method
    return method


def _check(name: str, caps: frozenset[str], hparams_cls: type, train: Callable[..., Any] | None,
           train_hparams_cls: type | None) -> None:
    """What each declared capability promises (kedit/core/plugins.py) is there, and only then."""
    unknown = sorted(caps - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"method {name!r} declares unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}")
    fields = getattr(hparams_cls, "__dataclass_fields__", None)
    if fields is None:
        raise ValueError(f"method {name!r}: hyper-parameters must be a dataclass, got {hparams_cls!r}")
    trains = train is not None and train_hparams_cls is not None
    if ("editor" in caps) != trains:
        raise ValueError(f"method {name!r}: a trained editor ('editor') and train= with train_hparams_cls= "
                         "go together")
    needed = {"editor": "editor", "stats": "mom2_n_samples"}
    for cap, field in needed.items():
        if cap in caps and field not in fields:
            raise ValueError(f"method {name!r} declares {cap!r}: its hyper-parameters need a field {field!r}")


def method_names(capability: str | None = None) -> list[str]:
    """The declared and registered methods (those with `capability`), sorted; imports none of them."""
    if capability is not None and capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    caps = {n: d.capabilities for n, d in declared_methods().items()}
    caps.update({n: m.capabilities for n, m in _REGISTRY.items()})
    return sorted(n for n, c in caps.items() if capability is None or capability in c)


def get_method(name: str) -> Method:
    """The method `name`, importing the module its entry point names on first use."""
    if name not in _REGISTRY:
        declared = declared_methods().get(name)
        if declared is None:
            raise MethodNotFoundError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
        try:
            declared.load()
        except ImportError as e:
            raise KeditError(f"method {name!r} (from {declared.distribution}) cannot be imported: {e}",
                             hint=f"reinstall {declared.distribution}") from e
        if name not in _REGISTRY:
            raise KeditError(f"{declared.entry_point.value} registers no method named {name!r}",
                             hint="its module must call register_method with that name")
    return _REGISTRY[name]
