"""Hyper-parameters from defaults, a YAML file and `key=value` strings, for any method's dataclass.

A method's hyper-parameter class is a dataclass with a `for_model(model)` classmethod giving
per-architecture defaults and a `__post_init__` that validates. This module layers a YAML
file and then command-line overrides on top, converting each string to the field's type, and
serialises back to a JSON-friendly dict so a commit can record exactly what ran.

Validation is declared, not written out: a field made with `bounded(default, gt=..., le=...)`
carries its range in its metadata (`layer_field()` a layer index, which `check_layers` also
holds to the model's depth), and `validate(hp)`, called by the `__post_init__` of each class
with numeric fields, checks each number of each field against it. Every number must also be finite
as a float32 (1e308 would overflow to inf when a method uses it) and every integer fit in 32
bits, bounded or not: NaN passes `nan < 0` checks unseen, so the rule is written once, here.

Caveats: unknown keys are an error when they come from the user (a typo must not be silently
ignored) and a warning when they come from a stored record written by another kedit version.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kedit.model.arch import arch_for, n_layers

__all__ = [
    "MAX_STEPS",
    "bounded",
    "check_layers",
    "hparams_from_dict",
    "hparams_from_overrides",
    "hparams_to_dict",
    "layer_field",
    "parse_value",
    "validate",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Larger step counts are typos (`num_steps=1e12` would run for years), not plans.
MAX_STEPS = 100_000
_FLOAT32_MAX = 3.4028234663852886e38
_INT32_MAX = 2**31 - 1

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval for a field's numbers; None leaves that side open."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def __str__(self) -> str:
        parts = [f"{op} {limit:g}" for op, limit in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if limit is not None]
        return " and ".join(parts)


def bounded(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose number (or every number of its tuple) must lie in the given range.

    Example:
        v_lr: float = bounded(1.0, gt=0)
        num_steps: int = bounded(25, ge=1, le=MAX_STEPS)
    """
    return dataclasses.field(default=default, metadata={"bounds": Bounds(gt, ge, lt, le)})


def layer_field(default: Any = dataclasses.MISSING) -> Any:
    """A layer index, or a tuple of them: >= 0 here, below the model's layer count in `check_layers`."""
    return dataclasses.field(default=default, metadata={"bounds": Bounds(ge=0), "layer": True})


def check_layers(hp: Any, model: Any) -> None:
    """Raise ValueError naming a `layer_field` of `hp` that points past `model`'s last layer."""
    layered = [f for f in dataclasses.fields(hp) if f.metadata.get("layer")]
    total = n_layers(model, arch_for(model)) if layered else 0
    for f in layered:
        for v in _numbers(getattr(hp, f.name)):
            if v >= total:
                raise ValueError(f"{f.name} {v} is past the model's last layer ({total} layers: 0..{total - 1})")


def _numbers(value: Any) -> typing.Iterator[int | float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _numbers(v)


def require_slot(hp: Any, field: str, slot_for: str) -> None:
    """A template field (a module name, a prompt) must hold '{}' where the layer or the subject goes."""
    value = getattr(hp, field)
    if "{}" not in value:
        raise ValueError(f"{field} must contain '{{}}' for the {slot_for}, got {value!r}")


def validate(hp: Any) -> None:
    """Raise ValueError naming the first field of `hp` with a number non-finite, too large or out of its bounds."""
    for f in dataclasses.fields(hp):
        bounds = f.metadata.get("bounds")
        for v in _numbers(getattr(hp, f.name)):
            if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX):
                raise ValueError(f"{f.name} must be a finite number (a float32), got {v!r}")
            if bounds is not None and not bounds.holds(v):
                raise ValueError(f"{f.name} must be {bounds}, got {v!r}")
            if isinstance(v, int) and abs(v) > _INT32_MAX:
                raise ValueError(f"{f.name} is out of range (a 32-bit integer), got {v!r}")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` (parsed YAML or a Python value) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{name}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _safe_yaml(value, f"the value of {name}")
        if not isinstance(value, list | tuple):
            raise ValueError(f"{name} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ValueError(f"{name} must have {len(args)} items, got {value!r}")
            return tuple(
                _coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        return origin(_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    return value


def _safe_yaml(text: str, where: str) -> Any:
    """Plain YAML only (safe_load: a tag that would build a Python object is refused, never run),
    its errors as one line naming `where` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where} is not plain YAML: {problem}{at}") from None


def parse_value(name: str, text: str, tp: Any) -> Any:
    """Parse a command-line string for a field of type `tp` (YAML syntax: 1e-3, true, [5, 10])."""
    if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)):
        if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
            return None
        return text
    return _coerce(name, _safe_yaml(text, f"the value of {name}"), tp)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def hparams_from_dict(cls: type[T], base: T, values: dict[str, Any], *, strict: bool = True) -> T:
    """`base` with `values` (already parsed: numbers, lists) replacing fields; validated again.

    strict: unknown keys raise ValueError (user input); otherwise they are logged and dropped
    (records written by another kedit version).
    """
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        msg = (
            f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(types_))}"
        )
        if strict:
            raise ValueError(msg)
        log.warning("%s (ignored)", msg)
    changes = {k: _coerce(k, v, types_[k]) for k, v in values.items() if k in types_}
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


# Keys of EasyEdit's hyper-parameter files that describe its environment rather than the method:
# kedit finds modules from the architecture table, runs on the device it is given, and computes its
# statistics from the model's own text. A file's key that the method's class knows is always kept.
EASYEDIT_ENVIRONMENT = frozenset({
    "model_name", "stats_dir", "device", "model_parallel", "fp16", "bf16", "mom2_dataset", "mom2_dtype",
    "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "v_loss_layer",
    "results_dir", "max_length", "model_class", "tokenizer_class", "tokenizer_name",
})
# EasyEdit's 100,000 Wikipedia samples would be days of self-generated text on a CPU.
EASYEDIT_MAX_SAMPLES = 10_000


def from_easyedit(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """An EasyEdit hyper-parameter file's keys as kedit's class takes them: `layers: [5]` is
    `layer: 5` for a one-layer method, `fact_token: subject_last` is what kedit's ROME does,
    environment keys are dropped (logged), `mom2_n_samples` is capped, and `archive` (a pickled
    trained editor) is refused: kedit never unpickles, it trains editors with `kedit train-editor`."""
    known = set(_field_types(cls))
    out = {k: v for k, v in values.items() if k != "alg_name"}
    if "archive" in out and "archive" not in known:
        raise ValueError(f"{source}: 'archive' names a pickled editor, which kedit never loads; "
                         "train one with `kedit train-editor` instead")
    if "layers" in out and "layers" not in known and "layer" in known:
        layers = out.pop("layers")
        if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], int):
            raise ValueError(f"{source}: layers must name exactly one layer for {cls.__name__}, got {layers!r}")
        out["layer"] = layers[0]
    if "fact_token" not in known and out.pop("fact_token", "subject_last") != "subject_last":
        raise ValueError(f"{source}: kedit reads the key at the subject's last token (fact_token subject_last)")
    dropped = sorted(k for k in out if k in EASYEDIT_ENVIRONMENT and k not in known)
    if dropped:
        log.info("%s: EasyEdit environment keys ignored: %s", source, ", ".join(dropped))
    out = {k: v for k, v in out.items() if k not in dropped}
    samples = out.get("mom2_n_samples")
    if isinstance(samples, int) and samples > EASYEDIT_MAX_SAMPLES and "mom2_n_samples" in known:
        log.warning("%s: mom2_n_samples %d capped at %d self-generated texts", source, samples, EASYEDIT_MAX_SAMPLES)
        out["mom2_n_samples"] = EASYEDIT_MAX_SAMPLES
    return out


def hparams_from_overrides(
    cls: type[T], model: Any, overrides: dict[str, str] | None = None, yaml_path: str | Path | None = None
) -> T:
    """Defaults for `model`, then a YAML file's keys, then `key=value` strings from the CLI.

    Example:
        hp = hparams_from_overrides(ROMEHyperParams, model, {"layer": "6", "mom2_adjustment": "false"})
    """
    hp = cls.for_model(model)  # type: ignore[attr-defined]
    if yaml_path is not None:
        loaded = _safe_yaml(Path(yaml_path).read_text(encoding="utf-8"), str(yaml_path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{yaml_path}: expected a mapping of hyper-parameters, got {type(loaded).__name__}"
            )
        hp = hparams_from_dict(cls, hp, from_easyedit(cls, loaded, str(yaml_path)))
    if overrides:
        types_ = _field_types(cls)
        unknown = sorted(set(overrides) - set(types_))
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(types_))}"
            )
        parsed = {k: parse_value(k, v, types_[k]) for k, v in overrides.items()}
        hp = hparams_from_dict(cls, hp, parsed)
    check_layers(hp, model)
    return hp


def hparams_to_dict(hp: Any) -> dict[str, Any]:
    """JSON-friendly dict of a hyper-parameter dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(hp, f.name)) for f in dataclasses.fields(hp)}
