"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al. 2023), as a versioned adapter.

The model's weights never change. A codebook sits on one module (by default the MLP output
projection of a late layer): each entry holds a key (the module's input at the last token of an
edit prompt, the prompt read exactly as `tokenizer(prompt)` encodes it: the key a user's query
meets, through `generate` or a pipeline), a value (a learned replacement for the module's output
there), a deflection radius ε and a label (the edit's target token ids). At inference every
position's input is a query: if its nearest key lies within that key's radius, the module's output
at that position is replaced by the key's value.

Editing one request (the paper's rules, applied when the new key q is placed):
- empty codebook, or the nearest key k_j is farther than ε_init + ε_j: a new entry (q, ε_init);
- otherwise, different labels: a new entry and the radii are *split*: ε_j = d/2 - 1e-5, ε_new = d/2;
- otherwise, equal labels: ε_j *expands* to d when d > ε_j ("coverage"), and entry j's value is
  trained further on the new prompt (no new entry).
- kedit's addition: a key within `duplicate_tol` of k_j (the same prompt edited again) supersedes
  entry j, whatever its label; the paper's split would give both radii d/2 = 0 and leave neither
  edit reachable.
The value is then trained with Adam (`edit_lr`, at most `n_iter` steps, stopping once the target's
mean NLL is below `early_stop_loss`) on the target's cross-entropy, the codebook in place.

Versioning: each commit's adapter holds only its own *records* (key, trained value, label, ε_init).
The codebook is never stored: it is rebuilt by replaying the ordered records in effect through
the rules above (`Codebook.place`, float64 distances on the CPU, so the replay is deterministic).
Reverting a commit removes its records; the replay of the rest gives the codebook as if that
edit had never been made: radii it split or expanded return to what the remaining records give.
The keys of later edits do not depend on the codebook (a module's input is computed before its
output is replaced), so they stay exact; their values were trained with the reverted entry present.

Replacement position: EasyEdit's `replace_last` replaces the last position only, with the key
position passed in while training. Here every position is a query, which gives the same result
for a prompt, and makes teacher-forced scoring, cached generation and uncached generation agree.

Speed: the model's weights are frozen while a value trains (no weight gradients). On the
architectures ROME's `SuffixForward` is checked for, a step runs only decoder layers L.. on the
last prompt token and the target tokens (everything below layer L, and every earlier position, is
the same at each step); elsewhere the prompt minus its last token runs once, its key/value cache
is kept, and each step runs the model on the last prompt token and the target tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kedit.methods.base import Adapter, EditRequest, EditResult, register_installer, register_method
from kedit.methods.forward import SuffixForward, partial_unsupported
from kedit.methods.freeze import frozen
from kedit.methods.hparams import MAX_STEPS, bounded, layer_field, require_slot, validate
from kedit.methods.prompts import input_device

from kedit.eval.metrics import answer_ids, prompt_ids
from kedit.model.adapters import register_conflict_check
from kedit.model.arch import arch_for, cache_keyword, get_module, n_layers, output_cache

__all__ = ["KIND", "Codebook", "GRACEHyperParams", "Record", "apply", "codebook_of", "install", "records_of"]

log = logging.getLogger(__name__)

KIND = "grace"
FORMAT = 1
SPLIT_MARGIN = 1e-5  # the older radius stops just short of the midpoint (EasyEdit's split_epsilons_in_half)
# An expanded radius reaches just past the new key: a key exactly on the boundary is a coin toss
# once the same prompt's activation is recomputed by another forward path (float32 noise ~1e-5
# relative). At the boundary the 1,000-edit benchmark lost a value's only path to the loss.
COVER_MARGIN = 1e-3

# The codebook's layer as a fraction of depth: EasyEdit edits layer 27 of Llama-2-7B's 32 and
# layer 35 of GPT-2 XL's 48; SmolLM2-135M (30 layers) lands at layer 25.
_LAYER_FRACTION = {"gpt2": 35 / 48}
_DEFAULT_FRACTION = 27 / 32


@dataclass
class GRACEHyperParams:
    """GRACE's knobs; `for_model` picks the layer and module from kedit.model.arch."""

    layer: int = layer_field()
    module_tmp: str  # keys are this module's input, values replace its output; "{}" = layer
    eps_init: float = bounded(1.0, gt=0)  # EasyEdit's `eps` (euclidean distance in the module's input space)
    n_iter: int = bounded(50, ge=1, le=MAX_STEPS)  # EasyEdit's llama file (gpt2-xl: 200; the original repo: 100)
    edit_lr: float = bounded(1.0, gt=0)
    early_stop_loss: float = bounded(1e-2, ge=0)  # stop training once the target's mean NLL is below this (0: never)
    val_init: str = "cold"  # cold: uniform [0, 1) as in the original; warm: the module's current output
    duplicate_tol: float = 1e-4  # a key this close to an existing one re-edits that entry (negative: off)
    partial_forward: bool = True  # train through layers L.. only, where checked (same losses, faster)
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self)
        require_slot(self, "module_tmp", "layer")
        if self.val_init not in ("cold", "warm"):
            raise ValueError(f"val_init must be 'cold' or 'warm', got {self.val_init!r}")

    @classmethod
    def for_model(cls, model: Any) -> GRACEHyperParams:
        arch = arch_for(model)
        depth = n_layers(model, arch)
        layer = min(round(_LAYER_FRACTION.get(arch.model_type, _DEFAULT_FRACTION) * depth), depth - 1)
        return cls(layer=layer, module_tmp=arch.out_proj_tmp)

    @property
    def module_name(self) -> str:
        return self.module_tmp.format(self.layer)


# ---------------------------------------------------------------------------------------------
# the codebook: records in, entries out


@dataclass(frozen=True)
class Record:
    """One edit as a commit stores it; the codebook is the replay of the records in effect."""

    key: torch.Tensor  # (d_in,) float32
    value: torch.Tensor  # (d_out,) float32
    label: tuple[int, ...]
    eps_init: float
    duplicate_tol: float
    prompt: str = ""  # for people (kedit show); the rules never read it
    target: str = ""


@dataclass(frozen=True)
class Placement:
    slot: int  # the entry whose value this record sets
    action: str  # add | split | expand | reuse | supersede
    distance: float  # to the nearest key before placing (inf for the first entry)
    radius: float  # the slot's radius after placing
    nearest_prompt: str | None  # the prompt of the entry this record split, expanded or re-edited


class Codebook:
    """Keys (float64), values, radii and labels, grown by `place` in record order."""

    def __init__(self, d_key: int, d_value: int) -> None:
        self.keys = torch.empty(0, d_key, dtype=torch.float64)
        self.values = torch.empty(0, d_value, dtype=torch.float32)
        self.radii = torch.empty(0, dtype=torch.float64)
        self.labels: list[tuple[int, ...]] = []
        self.prompts: list[str] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def copy(self) -> Codebook:
        other = Codebook(self.keys.shape[1], self.values.shape[1])
        other.keys, other.values, other.radii = self.keys.clone(), self.values.clone(), self.radii.clone()
        other.labels, other.prompts, other.n = list(self.labels), list(self.prompts), self.n
        return other

    def _grow(self) -> None:
        if self.n == self.keys.shape[0]:  # capacity doubling keeps a long replay linear
            cap = max(16, 2 * self.n)
            self.keys = torch.cat([self.keys, self.keys.new_zeros(cap - self.n, self.keys.shape[1])])
            self.values = torch.cat([self.values, self.values.new_zeros(cap - self.n, self.values.shape[1])])
            self.radii = torch.cat([self.radii, self.radii.new_zeros(cap - self.n)])

    def nearest(self, key: torch.Tensor) -> tuple[int | None, float]:
        if self.n == 0:
            return None, math.inf
        d = (self.keys[: self.n] - key.to(torch.float64)).norm(dim=1)
        j = int(d.argmin())
        return j, float(d[j])

    def _add(self, rec: Record, radius: float) -> int:
        self._grow()
        i = self.n
        self.keys[i] = rec.key.to(torch.float64)
        self.values[i] = rec.value.float()
        self.radii[i] = radius
        self.labels.append(rec.label)
        self.prompts.append(rec.prompt)
        self.n += 1
        return i

    def place(self, rec: Record) -> Placement:
        """Apply GRACE's rules for one record (see the module docstring); mutates the codebook."""
        j, d = self.nearest(rec.key)
        if j is None or d > rec.eps_init + float(self.radii[j]):
            return Placement(self._add(rec, rec.eps_init), "add", d, rec.eps_init, None)
        other = self.prompts[j]
        if d <= rec.duplicate_tol:
            action = "supersede"
        elif rec.label != self.labels[j]:
            self.radii[j] = d / 2 - SPLIT_MARGIN
            return Placement(self._add(rec, d / 2), "split", d, d / 2, other)
        elif d > float(self.radii[j]):
            self.radii[j] = d + COVER_MARGIN
            action = "expand"
        else:
            action = "reuse"
        self.values[j] = rec.value.float()
        self.labels[j] = rec.label
        self.prompts[j] = rec.prompt
        return Placement(j, action, d, float(self.radii[j]), other)


def replay(records: Sequence[Record], d_key: int, d_value: int) -> Codebook:
    book = Codebook(d_key, d_value)
    for rec in records:
        book.place(rec)
    return book


# ---------------------------------------------------------------------------------------------
# a codebook in a live model


class _Layer:
    """The forward hook on one module, and the codebook it applies."""

    def __init__(self, module: Any, name: str, d_key: int, d_value: int) -> None:
        self.module, self.name = module, name
        self.adapters: list[Adapter] = []
        self.records: list[Record] = []
        self.book = Codebook(d_key, d_value)
        self.trainable: tuple[int, torch.nn.Parameter] | None = None
        self.enabled = True
        self._device_cache: tuple | None = None
        self.handle = module.register_forward_hook(self._hook)

    def set_book(self, book: Codebook) -> None:
        self.book = book
        self._device_cache = None

    def _device_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if self._device_cache is None or self._device_cache[0] != (device, dtype):
            n = self.book.n
            keys = self.book.keys[:n].to(device)
            self._device_cache = ((device, dtype), keys, (keys * keys).sum(1), self.book.radii[:n].to(device),
                                  self.book.values[:n].to(device=device, dtype=dtype))
        return self._device_cache[1:]

    def _hook(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.book.n == 0:
            return output
        x = args[0]
        keys, key_sq, radii, values = self._device_tensors(output.device, output.dtype)
        q = x.reshape(-1, x.shape[-1]).to(torch.float64)
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ keys.T + key_sq  # float64: exact enough at d ~ 0
        dmin, idx = d2.clamp_min(0).min(dim=1)
        hit = dmin.sqrt() <= radii[idx]
        if not bool(hit.any()):
            return output
        if self.trainable is not None:
            slot, param = self.trainable
            values = torch.cat([values[:slot], param.to(values.dtype)[None], values[slot + 1:]])
        flat = output.reshape(-1, output.shape[-1])
        replaced = torch.where(hit[:, None], values[idx], flat)
        return replaced.reshape(output.shape)


def _layers(model: Any) -> dict[str, _Layer]:
    layers = getattr(model, "_kedit_grace", None)
    if layers is None:
        layers = {}
        object.__setattr__(model, "_kedit_grace", layers)
    return layers


def decode_adapter(adapter: Adapter) -> list[Record]:
    """The records of one stored GRACE adapter, in edit order."""
    t, cfg = adapter.tensors, adapter.config
    if cfg.get("format") != FORMAT:
        raise ValueError(f"GRACE adapter format {cfg.get('format')!r} is not {FORMAT}")
    lengths = t["label_lengths"].tolist()
    ids = t["label_ids"].tolist()
    entries = cfg.get("entries", [{}] * len(lengths))
    out, start = [], 0
    for i, n in enumerate(lengths):
        out.append(Record(t["keys"][i].float(), t["values"][i].float(), tuple(ids[start:start + n]),
                          float(cfg["eps_init"]), float(cfg["duplicate_tol"]),
                          entries[i].get("prompt", ""), entries[i].get("target", "")))
        start += n
    return out


def _layer_for(model: Any, name: str, key_dim: int | None = None, value_dim: int | None = None) -> _Layer:
    layers = _layers(model)
    if name not in layers:
        module = get_module(model, name)
        w = getattr(module, "weight", None)
        if key_dim is None or value_dim is None:
            if w is None:
                raise ValueError(f"{name} has no weight to size a codebook from")
            d_out, d_in = w.shape if type(module).__name__ != "Conv1D" else w.shape[::-1]
            key_dim, value_dim = key_dim or d_in, value_dim or d_out
        layers[name] = _Layer(module, name, key_dim, value_dim)
    return layers[name]


def install(model: Any, adapters: list[Adapter]) -> None:
    """kedit's installer for kind "grace": replay the records of `adapters` into hooks on `model`.

    When the adapters already installed are a prefix of `adapters` (the same objects: the edit
    pipeline appends one commit at a time), only the new records are placed.
    """
    by_module: dict[str, list[Adapter]] = {}
    for a in adapters:
        by_module.setdefault(a.config["module"], []).append(a)
    layers = _layers(model)
    for name in list(layers):
        if name not in by_module:
            layers.pop(name).handle.remove()
    for name, group in by_module.items():
        layer = _layer_for(model, name)
        done = layer.adapters
        if len(done) <= len(group) and all(a is b for a, b in zip(done, group, strict=False)):
            new = group[len(done):]
            book = layer.book
        else:
            new, book, layer.records = group, Codebook(*_dims(layer)), []
        for a in new:
            for rec in decode_adapter(a):
                book.place(rec)
                layer.records.append(rec)
        layer.adapters = list(group)
        layer.set_book(book)


def _dims(layer: _Layer) -> tuple[int, int]:
    return layer.book.keys.shape[1], layer.book.values.shape[1]


def codebook_of(model: Any, module_name: str) -> Codebook | None:
    """The codebook installed on `module_name`, if any (for tests and diagnostics)."""
    layer = _layers(model).get(module_name)
    return layer.book if layer is not None else None


def records_of(model: Any, module_name: str) -> list[Record]:
    layer = _layers(model).get(module_name)
    return list(layer.records) if layer is not None else []


register_installer(KIND, install)


def merge_conflicts(ours: list[Adapter], theirs: list[Adapter]) -> list[tuple[int, int, str]]:
    """Entries of the two sides on one module whose balls (ε_init around each key) overlap with
    different labels: replaying both would split their radii, and a query between them would
    get whichever is nearer, so the merge asks which one is meant."""
    found = []
    for i, a in enumerate(ours):
        for j, b in enumerate(theirs):
            if a.config.get("module") != b.config.get("module"):
                continue
            for ra in decode_adapter(a):
                for rb in decode_adapter(b):
                    d = float((ra.key.to(torch.float64) - rb.key.to(torch.float64)).norm())
                    if ra.label != rb.label and d <= ra.eps_init + rb.eps_init:
                        found.append((i, j, f"GRACE entries {ra.prompt!r} -> {ra.target!r} and {rb.prompt!r} -> "
                                            f"{rb.target!r} at {a.config.get('module')} overlap (distance {d:.3g} "
                                            f"within {ra.eps_init + rb.eps_init:.3g})"))
    return found


register_conflict_check(KIND, merge_conflicts)


# ---------------------------------------------------------------------------------------------
# editing


@torch.no_grad()
def _key(model: Any, layer: _Layer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input at the last prompt token, and its own output there (no replacement)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: tuple, output: torch.Tensor) -> None:
        seen["x"] = args[0][0, -1].detach()

    handle = layer.module.register_forward_hook(grab)
    try:
        batch = torch.tensor([ids], device=input_device(model))
        model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        handle.remove()
    x = seen["x"]
    layer.enabled = False
    try:
        own = layer.module(x[None, None])[0, 0]
    finally:
        layer.enabled = True
    return x.float().cpu(), own.float().cpu()


class _CachedPrefix:
    """Any architecture: the prompt minus its last token runs once; each step runs the rest on its cache."""

    def __init__(self, model: Any, ids: list[int], target_ids: list[int]) -> None:
        device = input_device(model)
        self.model, self.prefix, suffix = model, ids[:-1], [ids[-1], *target_ids[:-1]]
        self.cache = None
        if self.prefix:
            with torch.no_grad():
                batch = torch.tensor([self.prefix], device=device)
                self.cache = output_cache(model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=True))
        self.suffix = torch.tensor([suffix], device=device)
        self.mask = torch.ones(1, len(self.prefix) + len(suffix), dtype=torch.long, device=device)

    def logits(self) -> torch.Tensor:
        out = self.model(input_ids=self.suffix, attention_mask=self.mask, use_cache=self.cache is not None,
                         **{cache_keyword(self.model.forward): self.cache}).logits[0]
        if self.cache is not None:
            self.cache.crop(-self.suffix.shape[1])  # negative: drop this step's tokens (transformers 4 and 5)
        return out


class _Suffix:
    """Checked architectures: only layers L.. on the last prompt token and the target (ROME's SuffixForward)."""

    def __init__(self, model: Any, ids: list[int], target_ids: list[int], layer: int) -> None:
        self.runner = SuffixForward(model, [ids + target_ids[:-1]], [len(ids) - 1], layer, 0)
        self.head = model.get_output_embeddings()

    def logits(self) -> torch.Tensor:
        return self.head(self.runner.hidden())[0]


def _train_value(model: Any, layer: _Layer, slot: int, init: torch.Tensor, ids: list[int],
                 target_ids: list[int], hp: GRACEHyperParams) -> tuple[torch.Tensor, int, float]:
    """Adam on the target's cross-entropy, the codebook in place with `slot`'s value trainable."""
    device = input_device(model)
    width = len(ids) + len(target_ids) - 1
    runner = (_Suffix(model, ids, target_ids, hp.layer) if hp.partial_forward and _owns_layer(model, hp)
              and partial_unsupported(model, width) is None else _CachedPrefix(model, ids, target_ids))
    target = torch.tensor(target_ids, device=device)
    param = torch.nn.Parameter(init.to(device=device, dtype=torch.float32).clone())
    opt = torch.optim.Adam([param], lr=hp.edit_lr)
    layer.trainable = (slot, param)
    loss_value, steps = math.inf, 0
    try:
        with frozen(model):
            for _ in range(hp.n_iter):
                loss = F.cross_entropy(runner.logits().float(), target)
                loss_value = float(loss.detach())
                if not loss.requires_grad:
                    raise RuntimeError(f"GRACE: the prompt's key fell outside codebook entry {slot}, "
                                       "so its value cannot be trained (a radius/key mismatch: please report it)")
                if loss_value < hp.early_stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
    finally:
        layer.trainable = None
    return param.detach().float().cpu(), steps, loss_value


def _owns_layer(model: Any, hp: GRACEHyperParams) -> bool:
    """The partial forward starts at decoder layer `hp.layer`: the codebook module must be inside it."""
    try:
        return hp.module_name.startswith(arch_for(model).layer_tmp.format(hp.layer) + ".")
    except ValueError:
        return False


def _init_value(hp: GRACEHyperParams, own_output: torch.Tensor, index: int) -> torch.Tensor:
    if hp.val_init == "warm":
        return own_output.clone()
    gen = torch.Generator().manual_seed(hp.seed + index)
    return torch.rand(own_output.shape[0], generator=gen)  # the original's cold start


def _encode(records: list[Record], placements: list[Placement], steps: list[int], losses: list[float],
            seconds: list[float], hp: GRACEHyperParams) -> Adapter:
    tensors = {
        "keys": torch.stack([r.key for r in records]).contiguous(),
        "values": torch.stack([r.value for r in records]).contiguous(),
        "label_ids": torch.tensor([t for r in records for t in r.label], dtype=torch.int64),
        "label_lengths": torch.tensor([len(r.label) for r in records], dtype=torch.int64),
    }
    entries = []
    for r, p, s, loss, sec in zip(records, placements, steps, losses, seconds, strict=True):
        entries.append({
            "prompt": r.prompt, "target": r.target, "action": p.action,
            "distance": None if math.isinf(p.distance) else round(p.distance, 6),
            "radius": round(p.radius, 6), "nearest": p.nearest_prompt,
            "steps": s, "loss": round(loss, 6), "seconds": round(sec, 3),
        })
    config = {"format": FORMAT, "module": hp.module_name, "layer": hp.layer, "eps_init": hp.eps_init,
              "duplicate_tol": hp.duplicate_tol, "dist": "euclidean", "replacement": "every_matching_position",
              "entries": entries}
    return Adapter(KIND, tensors, config)


def apply(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: GRACEHyperParams) -> EditResult:
    """Add the requests, in order, to the codebook installed on `model` (empty if none); the model's
    codebook is left as it was found, and the new records come back as one adapter."""
    if not requests:
        raise ValueError("no requests to edit")
    try:
        layer = _layer_for(model, hparams.module_name)
    except ValueError as e:
        raise ValueError(f"{e} (set module_tmp and layer)") from e
    original_book, original_records = layer.book, list(layer.records)
    records: list[Record] = []
    placements: list[Placement] = []
    steps, losses, seconds = [], [], []
    book = original_book
    try:
        for i, req in enumerate(requests):
            t0 = time.perf_counter()
            ids = prompt_ids(tok, req.text)
            if not ids:
                raise ValueError(f"the prompt {req.text!r} tokenizes to nothing")
            target_ids = answer_ids(tok, req.target_new)
            key, own = _key(model, layer, ids)
            draft = Record(key, torch.zeros_like(own), tuple(target_ids), hparams.eps_init, hparams.duplicate_tol,
                           req.text, req.target_new)
            book = book.copy()
            nearest, _ = book.nearest(key)
            prior = book.values[nearest].clone() if nearest is not None else None
            placement = book.place(draft)
            # A new entry starts cold (or warm); an existing one goes on training from its value, as in GRACE.
            init = _init_value(hparams, own, i) if placement.action in ("add", "split") else prior
            layer.set_book(book)
            value, n_steps, loss = _train_value(model, layer, placement.slot, init, ids, target_ids, hparams)
            rec = Record(key, value, draft.label, draft.eps_init, draft.duplicate_tol, draft.prompt, draft.target)
            book.values[placement.slot] = value
            layer.set_book(book)
            records.append(rec)
            placements.append(placement)
            steps.append(n_steps)
            losses.append(loss)
            seconds.append(time.perf_counter() - t0)
    finally:
        layer.set_book(original_book)
        layer.records = original_records
        if not original_records and not layer.adapters:
            _layers(model).pop(layer.name).handle.remove()
    adapter = _encode(records, placements, steps, losses, seconds, hparams)
    info = {"codebook_entries": book.n, "module": hparams.module_name,
            "actions": ",".join(p.action for p in placements), "value_steps": sum(steps),
            "final_loss": max(losses)}
    return EditResult(adapters=[adapter], info=info)


register_method("grace", GRACEHyperParams, apply)
