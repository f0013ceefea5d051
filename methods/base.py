"""The contract between kedit and its editing methods.

A method takes a model, its tokenizer, edit requests and hyper-parameters, and returns an
`EditResult`: weight deltas keyed by state-dict name (or adapters). It never writes the
repository, and it must leave the model it was given as it found it (edit a copy of the
weights, or restore them), because the engine applies the deltas itself with its canonical
arithmetic and records the resulting hashes.

Calling sequence:
    method = get_method("rome")
    hparams = method.hparams_cls.for_model(model)        # per-architecture defaults
    result = method.apply(model, tokenizer, requests, hparams)
    repo.commit(result.deltas, adapters=result.adapters, ...)

A method is one module that calls `register_method` when imported, plus one `kedit.methods`
entry point naming that module and the capabilities the method declares (methods/registry.py,
kedit/core/plugins.py): built-in and third-party methods alike. What the engine passes to `apply`
beyond the four arguments follows from those capabilities (`stats` -> `stats_provider`, `memory`
-> `memory`, `editor` -> `load_editor_fn`), never from `apply`'s signature. A method that returns
adapters registers, with `register_installer`, how its kind of adapter is put into a live model.
Long work reports through the `progress` callback it is given (`ProgressFn`).

A method module imports from kedit only this module, the shared machinery of methods/, the
architecture table (kedit.model.arch) and the metrics (kedit.eval.metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kedit.methods.registry import Method, get_method, method_names, register_method

from kedit.core.delta import Adapter, Dense, LowRank, Replace, WeightDelta

__all__ = [
    "Adapter",
    "Dense",
    "EditRequest",
    "EditResult",
    "LowRank",
    "Method",
    "Progress",
    "ProgressFn",
    "Replace",
    "TrainItem",
    "WeightDelta",
    "get_method",
    "method_names",
    "no_progress",
    "register_installer",
    "register_method",
]


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    `prompt` holds the subject, or `{}` where the subject goes; `target_new` is the completion
    the edited model should give (no leading space needed: methods add it where the
    tokenizer wants one). The other fields are for evaluation.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbourhood: tuple[str, ...] = ()  # prompts about other subjects whose answer must stay
    locality: tuple[tuple[str, str], ...] = ()  # (prompt, answer) pairs unrelated to the edit
    portability: tuple[tuple[str, str], ...] = ()  # (prompt, answer) pairs that follow from the edit

    def __post_init__(self) -> None:
        _check_texts(self)
        if self.prompt.count("{}") > 1 or "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            raise ValueError(f"the prompt may hold '{{}}' once, where the subject goes, and no other braces: "
                             f"{self.prompt[:80]!r}")
        if not self.subject.strip():
            raise ValueError("the subject is empty")
        if not self.target_new.strip():
            raise ValueError("the target is empty")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise ValueError(f"the subject {self.subject!r} is not in the prompt {self.prompt!r}")

    @property
    def template(self) -> str:
        """The prompt with `{}` in place of the subject's first occurrence."""
        if "{}" in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, "{}", 1)

    @property
    def text(self) -> str:
        """The prompt with the subject written in."""
        return self.template.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighbourhood": list(self.neighbourhood),
            "locality": [list(p) for p in self.locality],
            "portability": [list(p) for p in self.portability],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=d["target_new"],
            target_true=d.get("target_true"),
            paraphrases=tuple(d.get("paraphrases", ())),
            neighbourhood=tuple(d.get("neighbourhood", ())),
            locality=tuple(tuple(p) for p in d.get("locality", ())),
            portability=tuple(tuple(p) for p in d.get("portability", ())),
        )


# A longer prompt or target is a pasted file, not a fact: its tokens would not fit a model's context.
MAX_TEXT_CHARS = 10_000


def _check_texts(request: EditRequest) -> None:
    """Every field holds text of a sane length (JSON records give numbers, nulls and lists too)."""
    pairs = {"locality": request.locality, "portability": request.portability}
    texts: list[tuple[str, Any]] = [("prompt", request.prompt), ("subject", request.subject),
                                    ("target", request.target_new)]
    if request.target_true is not None:
        texts.append(("target_true", request.target_true))
    for name in ("paraphrases", "neighbourhood", *pairs):
        items = getattr(request, name)
        if not isinstance(items, tuple):
            raise ValueError(f"{name} must be a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            if name in pairs:
                if not isinstance(item, tuple) or len(item) != 2:
                    raise ValueError(f"{name}[{i}] must be a (prompt, answer) pair, got {item!r:.80}")
                texts += [(f"{name}[{i}] prompt", item[0]), (f"{name}[{i}] answer", item[1])]
                if isinstance(item[0], str) and not item[0].strip():
                    raise ValueError(f"the {name}[{i}] prompt is empty")
            else:
                texts.append((f"{name}[{i}]", item))
    for name, text in texts:
        if not isinstance(text, str):
            raise ValueError(f"the {name} must be text, got {type(text).__name__} {text!r:.40}")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"the {name} is {len(text):,} characters long (at most {MAX_TEXT_CHARS:,})")


@dataclass
class EditResult:
    """What a method returns: deltas by state-dict name, adapters, and diagnostics."""

    deltas: dict[str, WeightDelta] = field(default_factory=dict)
    adapters: list[Adapter] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: norms, losses, timings
    # Tensors kept with the commit for this method's later edits; a method that declares `memory`
    # gets, in `apply(memory=...)`, the memories of the edits still in effect (AlphaEdit's earlier keys).
    memory: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainItem:
    """A training record for a method with a trained editor: the request and its task family."""

    request: EditRequest
    task: str = "facts"


class Progress(Protocol):
    """A progress bar as a method drives one (the part of tqdm's interface kedit uses)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values: Any) -> None: ...

    def close(self) -> None: ...


# progress(total=, initial=, desc=, unit=) -> a bar: the engine passes its own (terminal bar or log
# lines); a method called without one shows nothing.
ProgressFn = Callable[..., Progress]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(**_bar: Any) -> Progress:
    """The progress of a method called without one: nothing shown."""
    return _Silent()


def register_installer(kind: str, installer: Callable[[Any, list[Adapter]], None]) -> None:
    """Make `installer` the one that puts adapters of `kind` into live models (kedit.model.adapters).

    Imported when called: kedit.model.adapters reaches the repository's storage, which imports this
    module, and `import kedit.methods.base` stays cheap."""
    from kedit.model.adapters import register_installer as register

    register(kind, installer)
