"""MEND's editor network and gradient factors (Mitchell et al. 2022), shared by MEND and InstructEdit.

For a linear layer y = W u, the gradient of a loss is a sum of rank-one terms,
∇_W L = Σ_t δ_t u_tᵀ with u_t the layer's input at token t and δ_t = ∂L/∂y_t.
A small trained network g (the editor) maps each pair (u_t, δ_t) to (ũ_t, δ̃_t), and the edit is

    W̃ = W − α_ℓ Σ_t δ̃_t ũ_tᵀ        (α_ℓ a learned step size per edited layer)

so the delta is a sum of rank-one terms: one `LowRank` per edited matrix, of rank = the number of
tokens with a non-zero gradient (a commit holds factors, not matrices).

The editor (`MENDEditor`), per weight shape and shared by the layers of that shape:
  1. normalise x = [u; δ] with running mean and standard deviation (Welford, updated in training),
  2. scale and shift by the layer's "mode" vectors (initialised to 1 and 0),
  3. an identity-initialised MLP: each layer is z + relu?(U V z + b) with U = 0 and b = 0 at start
     (relu on all but the last layer),
  4. undo the normalisation: out = μ + σ·z.
Step 4 is kedit's choice, not the paper's (whose output stays normalised): with it the untrained
editor is exactly the identity on gradients, so its first update is one step of gradient descent,
−α∇_W L, and training starts from plain fine-tuning rather than from a rescaled gradient.

Hooks: `capture_factors` reads u_t with a forward hook and δ_t as the gradient with respect to
the layer's output, which it turns into a leaf; nothing below the first edited layer needs a
gradient, so the backward pass stops there.

This module holds what MEND, InstructEdit (methods/instructedit.py) and training
(methods/mend_train.py) share: the training parameters, the editor network, the gradient
factors and the edit they give. The methods themselves are `mend.py` and `instructedit.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kedit.methods.base import EditRequest, LowRank
from kedit.methods.freeze import frozen
from kedit.methods.hparams import MAX_STEPS, bounded, layer_field, require_slot, validate
from kedit.methods.prompts import input_device
from torch import nn

from kedit.eval.metrics import answer_ids, prompt_ids
from kedit.model.arch import arch_for, get_module, n_layers

__all__ = [
    "EditorLoader",
    "Factors",
    "MENDEditor",
    "MENDTrainParams",
    "Rows",
    "build_editor",
    "capture_factors",
    "capture_hooks",
    "check_model",
    "delta_hooks",
    "edit_loss",
    "edit_rows",
    "edit_with",
    "editor_deltas",
    "load_editor",
    "make_rows",
    "module_shapes",
    "nonzero_tokens",
    "transform",
]

# (editor id) -> (state tensors, metadata dict with "method" and "config"); given by the engine
EditorLoader = Callable[[str], tuple[dict[str, torch.Tensor], dict[str, Any]]]

EPS = 1e-7


# ---------------------------------------------------------------------------------------------
# the editor's training parameters (its structure is stored with it)


@dataclass
class MENDTrainParams:
    """How an editor is built and trained; stored with the trained editor.

    Defaults are sized for a CPU: the last three MLP output projections (MEND edits the last
    layers), a rank-256 editor (MEND: min(1920, dim)), edits batched 8 to a step.
    """

    layers: tuple[int, ...] = layer_field()
    module_tmp: str  # e.g. "model.layers.{}.mlp.down_proj"
    transposed: bool = False  # GPT-2 Conv1D stores Wᵀ
    rank: int = bounded(256, ge=1, le=MAX_STEPS)
    n_hidden: int = bounded(1, ge=0, le=64)  # hidden layers of the identity MLP (MEND: 1, so two layers in all)
    edit_lr: float = bounded(0.0, ge=0)  # initial step α_ℓ of every edited layer; 0: line search on the first batch
    # Adam on the editor network (SmolLM2: 1e-4 reached 29% reliability in 50 steps, 3e-4 52% in 100)
    lr: float = bounded(3e-4, gt=0)
    lr_lr: float = bounded(1e-3, gt=0)  # Adam on the step sizes (MEND trains them apart)
    cedit: float = bounded(1.0, ge=0)  # weight of the edit NLL (on the prompt and its paraphrases)
    cloc: float = bounded(1.0, ge=0)  # weight of the locality KL (unrelated prompts)
    batch_size: int = bounded(8, ge=1, le=MAX_STEPS)  # edits per training step, applied together
    max_steps: int = bounded(20000, ge=1, le=100 * MAX_STEPS)
    max_minutes: float = bounded(0.0, ge=0)  # stop after this much training time (0: no limit)
    val_every: int = bounded(100, ge=1)  # steps between validations
    patience: int = bounded(8, ge=1)  # validations without improvement before stopping (the validation loss is noisy)
    val_size: int = bounded(48, ge=0)  # records held out for validation when no --val file is given
    grad_clip: float = bounded(100.0, gt=0)
    max_length: int = bounded(96, ge=1, le=MAX_STEPS)  # tokens per row; longer rows are dropped
    n_paraphrases: int = bounded(2, ge=0)  # per edit, in the edit loss
    checkpoint_every: int = bounded(25, ge=1)
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)  # type: ignore[assignment]
        validate(self)
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        require_slot(self, "module_tmp", "layer")

    @classmethod
    def for_model(cls, model: Any) -> MENDTrainParams:
        arch = arch_for(model)
        total = n_layers(model, arch)
        return cls(layers=tuple(range(max(total - 3, 0), total)), module_tmp=arch.out_proj_tmp,
                   transposed=arch.out_proj_transposed)

    @property
    def modules(self) -> list[str]:
        return [self.module_tmp.format(layer) for layer in self.layers]


# ---------------------------------------------------------------------------------------------
# the editor network


class _LowRankResidual(nn.Module):
    """z + act(U V z + b): U (d, r) starts at 0, so the layer starts as the identity."""

    def __init__(self, dim: int, rank: int, relu: bool) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.b = nn.Parameter(torch.zeros(dim))
        self.relu = relu

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z (N, d)
        h = (z @ self.v.t()) @ self.u.t() + self.b  # (N, d)
        return z + (F.relu(h) if self.relu else h)


class _IdentityMLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_LowRankResidual(dim, rank, relu=i < n_hidden) for i in range(n_hidden + 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z)
        return z


def _shape_key(d_in: int, d_out: int) -> str:
    return f"{d_in}x{d_out}"


class MENDEditor(nn.Module):
    """g: (u, δ) pairs of each edited module -> (ũ, δ̃), plus the step sizes α.

    `shapes` lists (d_in, d_out) per edited module, in the order of `MENDTrainParams.modules`.
    One MLP per distinct shape; per module: its normalisation statistics, mode scale and shift.
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, n_hidden: int, edit_lr: float) -> None:
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.nets = nn.ModuleDict({_shape_key(a, b): _IdentityMLP(a + b, min(rank, a + b), n_hidden)
                                   for a, b in dict.fromkeys(self.shapes)})
        self.scale = nn.ParameterList(nn.Parameter(torch.ones(a + b)) for a, b in self.shapes)
        self.shift = nn.ParameterList(nn.Parameter(torch.zeros(a + b)) for a, b in self.shapes)
        self.step = nn.Parameter(torch.full((len(self.shapes),), float(edit_lr)))
        for i, (a, b) in enumerate(self.shapes):
            self.register_buffer(f"count{i}", torch.zeros((), dtype=torch.float64))
            self.register_buffer(f"mean{i}", torch.zeros(a + b, dtype=torch.float64))
            self.register_buffer(f"m2{i}", torch.zeros(a + b, dtype=torch.float64))

    def editor_parameters(self) -> list[nn.Parameter]:
        """Everything but the step sizes (they get their own optimiser)."""
        return [p for name, p in self.named_parameters() if name != "step"]

    @torch.no_grad()
    def observe(self, i: int, x: torch.Tensor) -> None:
        """Fold rows x (N, d) into module i's running mean and variance (Chan et al.'s merge)."""
        x = x.detach().to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        count, mean, m2 = getattr(self, f"count{i}"), getattr(self, f"mean{i}"), getattr(self, f"m2{i}")
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta**2 * (count * n_b / total)
        count.fill_(total)

    def stats(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of module i's inputs, float32; (0, 1) before any observation."""
        count, mean, m2 = getattr(self, f"count{i}"), getattr(self, f"mean{i}"), getattr(self, f"m2{i}")
        if count < 2:
            return torch.zeros_like(mean, dtype=torch.float32), torch.ones_like(mean, dtype=torch.float32)
        return mean.float(), (m2 / (count - 1)).sqrt().float()

    def forward(self, i: int, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Module i's pairs u (N, d_in), δ (N, d_out) -> ũ (N, d_in), δ̃ (N, d_out)."""
        d_in, d_out = self.shapes[i]
        x = torch.cat([u, d], dim=-1).float()  # (N, d_in + d_out)
        mean, std = self.stats(i)
        std = std.to(x.device) + EPS
        mean = mean.to(x.device)
        z = (x - mean) / std
        z = self.nets[_shape_key(d_in, d_out)](z * self.scale[i] + self.shift[i])
        out = mean + std * z
        return out[:, :d_in], out[:, d_in:]


def build_editor(params: MENDTrainParams, shapes: Sequence[tuple[int, int]]) -> MENDEditor:
    return MENDEditor(shapes, params.rank, params.n_hidden, params.edit_lr or 1e-3)


def module_shapes(model: Any, params: MENDTrainParams) -> list[tuple[int, int]]:
    """(d_in, d_out) of each edited module, whatever its stored layout."""
    shapes = []
    for name in params.modules:
        w = get_module(model, name).weight
        shapes.append((w.shape[0], w.shape[1]) if params.transposed else (w.shape[1], w.shape[0]))
    return shapes


# ---------------------------------------------------------------------------------------------
# gradient factors and updates


@dataclass
class Factors:
    """Per edited module: inputs u (N, d_in) and output gradients δ (N, d_out) of the tokens that matter."""

    u: list[torch.Tensor]
    d: list[torch.Tensor]


@contextlib.contextmanager
def capture_hooks(modules: Sequence[nn.Module]) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record each module's input and output; the gradient with respect to the output is δ.

    An output that needs no gradient (nothing below it does) becomes a leaf that does; the others
    stay in the graph, so the δ of a lower edited layer includes the paths through the higher ones.
    """
    inputs: list[torch.Tensor] = [torch.empty(0)] * len(modules)
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, i: int = i) -> torch.Tensor:
            inputs[i] = args[0].detach()
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            outputs[i] = out
            return out
        handles.append(module.register_forward_hook(hook))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def nonzero_tokens(u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (B, T, ·) to rows and keep tokens whose input and gradient are both non-zero."""
    u2, d2 = u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1])
    keep = (u2 != 0).any(-1) & (d2 != 0).any(-1)
    return u2[keep], d2[keep]


def edit_loss(logits: torch.Tensor, labels: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Σ over rows of the mean NLL of that row's label tokens (logits (N, V), labels (N,))."""
    nll = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    per_row = torch.zeros(n_rows, device=nll.device).index_add(0, row_of, nll)
    counts = torch.bincount(row_of, minlength=n_rows).clamp(min=1)
    return (per_row / counts).sum()


@dataclass
class Rows:
    """Right-padded token rows and where their labels are: row r predicts labels[k] at column cols[k]."""

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)


def make_rows(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, device: Any = "cpu") -> Rows:
    """(prompt ids, answer ids) pairs -> prompt + answer[:-1] rows whose label positions predict the answer."""
    width = max(len(p) + len(a) - 1 for p, a in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for r, (p, a) in enumerate(seqs):
        row = p + a[:-1]
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        for j, t in enumerate(a):
            rows.append(r)
            cols.append(len(p) - 1 + j)
            labels.append(t)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return Rows(ids.to(device), mask.to(device), as_t(rows), as_t(cols), as_t(labels))


def head_logits(model: Any, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Output-head logits at the label positions only (the head is the largest matrix)."""
    return model.get_output_embeddings()(hidden[rows.rows, rows.cols])


def edit_rows(tok: Any, texts: Sequence[str], targets: Sequence[str], device: Any = "cpu") -> Rows:
    """Rows for edit prompts: each prompt as the metrics feed it, then its target."""
    pad = next(int(t) for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
    return make_rows([(prompt_ids(tok, t), answer_ids(tok, a)) for t, a in zip(texts, targets, strict=True)],
                     pad, device)


def capture_factors(model: Any, params: MENDTrainParams, rows: Rows,
                    forward: Callable[[Rows], torch.Tensor] | None = None) -> tuple[Factors, float]:
    """u_t and δ_t of the edit loss at every edited module, and the loss itself.

    `forward` maps rows to the final hidden states (B, T, H); by default the model's base forward.
    """
    modules = [get_module(model, name) for name in params.modules]
    run = forward or (lambda r: model.base_model(input_ids=r.ids, attention_mask=r.mask, use_cache=False)[0])
    with frozen(model), torch.enable_grad(), capture_hooks(modules) as (inputs, outputs):
        hidden = run(rows)
        loss = edit_loss(head_logits(model, hidden, rows), rows.labels, rows.rows, rows.ids.shape[0])
        grads = torch.autograd.grad(loss, outputs)
    us, ds = [], []
    for u, d in zip(inputs, grads, strict=True):
        u2, d2 = nonzero_tokens(u.float(), d.float())
        us.append(u2)
        ds.append(d2)
    return Factors(us, ds), float(loss.detach())


def transform(editor: MENDEditor, factors: Factors, *, observe: bool = False) -> Factors:
    """The editor's (ũ, δ̃) for every module; `observe` first folds the pairs into its statistics."""
    us, ds = [], []
    for i, (u, d) in enumerate(zip(factors.u, factors.d, strict=True)):
        if observe:
            editor.observe(i, torch.cat([u, d], dim=-1))
        ut, dt = editor(i, u, d)
        us.append(ut)
        ds.append(dt)
    return Factors(us, ds)


@contextlib.contextmanager
def delta_hooks(model: Any, params: MENDTrainParams, edited: Factors, steps: torch.Tensor) -> Iterator[None]:
    """Run the model as if W̃ = W − α Σ δ̃ ũᵀ, without touching W: y += −α (x ũᵀ) δ̃ (autograd flows)."""
    handles = []
    for i, name in enumerate(params.modules):
        u, d = edited.u[i], edited.d[i]

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, u: torch.Tensor = u, d: torch.Tensor = d,
                 i: int = i) -> torch.Tensor:
            x = args[0]
            return out + (-steps[i]) * ((x.to(u.dtype) @ u.t()) @ d).to(out.dtype)

        handles.append(get_module(model, name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def editor_deltas(params: MENDTrainParams, edited: Factors, steps: torch.Tensor) -> dict[str, LowRank]:
    """The update of each edited matrix as factors in its stored layout: Σ_t −α δ̃_t ũ_tᵀ."""
    out = {}
    for i, name in enumerate(params.modules):
        u, d = edited.u[i].detach().float().cpu(), edited.d[i].detach().float().cpu()  # (r, d_in), (r, d_out)
        if u.shape[0] == 0:
            continue
        scaled = -float(steps[i].detach()) * d
        out[name + ".weight"] = LowRank(u.t().contiguous(), scaled) if params.transposed else \
            LowRank(scaled.t().contiguous(), u)
    return out


# ---------------------------------------------------------------------------------------------
# a stored editor, and an edit with it: one forward and backward pass, then the editor


def load_editor(loader: EditorLoader, editor_id: str, method: str) -> tuple[MENDEditor, MENDTrainParams, dict]:
    """Rebuild a stored editor; its metadata carries the training parameters and the shapes."""
    tensors, meta = loader(editor_id)
    if meta.get("method") != method:
        raise ValueError(f"editor {editor_id[:12]} was trained for {meta.get('method')!r}, not {method!r}")
    config = json.loads(meta["config"]) if isinstance(meta.get("config"), str) else meta["config"]
    params = MENDTrainParams(**config["params"])
    editor = build_editor(params, [tuple(s) for s in config["shapes"]])
    editor.load_state_dict(tensors)
    return editor.eval(), params, config


def check_model(model: Any, params: MENDTrainParams, editor: MENDEditor) -> None:
    """The editor fits this model: its modules exist with the shapes it was trained on."""
    try:
        shapes = module_shapes(model, params)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"the editor does not fit this model: {e}") from e
    if shapes != editor.shapes:
        raise ValueError(f"the editor was trained on shapes {editor.shapes}, this model has {shapes}")


def edit_with(model: Any, tok: Any, requests: Sequence[EditRequest], editor: MENDEditor, params: MENDTrainParams,
              edit_texts: Sequence[str]) -> tuple[dict[str, LowRank], dict[str, Any]]:
    """Deltas for `requests`, whose gradient is taken on `edit_texts` (the prompts, or wrapped ones)."""
    device = input_device(model)
    rows = edit_rows(tok, edit_texts, [r.target_new for r in requests], device)
    factors, loss = capture_factors(model, params, rows)
    editor = editor.to(device)
    with torch.no_grad():
        edited = transform(editor, factors)
        deltas = editor_deltas(params, edited, editor.step.detach())
    info = {"edit_nll_before": round(loss, 4), "ranks": {k: v.rank for k, v in deltas.items()},
            "update_norms": {k: round(float((v.a @ v.b).norm()), 4) for k, v in deltas.items()}}
    return deltas, info
