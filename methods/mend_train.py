"""Training a MEND editor: L = cedit·L_edit + cloc·L_loc, early stopping on validation.

One step takes a batch of edits and applies them together, as one update:
  1. one pass of the unedited model over the edit rows (prompt + target) and the locality rows;
     the edit loss's gradient at each edited module gives the pairs (u_t, δ_t), and the locality
     rows give the reference distribution p_θ;
  2. the editor turns the pairs into (ũ_t, δ̃_t) (its statistics first absorb them);
  3. a second pass with W̃ = W − α Σ δ̃ ũᵀ added through hooks: L_edit is the NLL of the target on the
     edit prompt and its paraphrases, L_loc = KL(p_θ ‖ p_θ̃) at the locality answers' positions;
  4. Adam on the editor (`lr`) and, apart, on the step sizes α (`lr_lr`); gradient clipping.

CPU economy: the model's weights never change, so the input of the first edited layer is the same
at every step for a given row. It is computed once per row (`HiddenCache`) and each step runs only
the edited layers and the output head at the answer positions (`TopForward`), for architectures
whose forward takes `inputs_embeds` as the first layer's input unchanged; the others run the whole
model. tests/methods/test_mend.py checks both give the same logits.

Checkpoints (through the engine's `checkpoint` object) hold the editor, the best editor so far,
both optimisers' states and a JSON state (step, best validation loss, history, elapsed time); the
order of the data is a function of the seed and the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from kedit.methods.base import ProgressFn, TrainItem, no_progress
from kedit.methods.freeze import frozen
from kedit.methods.mend_net import (
    Factors,
    MENDEditor,
    MENDTrainParams,
    Rows,
    build_editor,
    capture_hooks,
    delta_hooks,
    head_logits,
    make_rows,
    module_shapes,
    nonzero_tokens,
    transform,
)
from torch import nn

from kedit.eval.metrics import answer_ids, prompt_ids
from kedit.model.arch import arch_for, get_module

__all__ = ["Checkpoint", "TrainedEditor", "train"]

log = logging.getLogger(__name__)

# Architectures whose model forward feeds `inputs_embeds` to the first layer as they are (no
# positional embedding added, no scaling): the run can start at any layer from a cached input.
_TOP_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gptj", "olmo", "olmo2"})


class Checkpoint(Protocol):
    """Where the engine keeps a run's checkpoint (atomic writes; see kedit.edit.trained)."""

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None: ...

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None: ...


@dataclass
class TrainedEditor:
    state: dict[str, torch.Tensor]  # the editor's state dict (best validation)
    config: dict[str, Any]  # shapes and training parameters: enough to rebuild it
    metrics: dict[str, Any]  # validation metrics of that state, steps, time, why it stopped
    history: list[dict[str, Any]] = field(default_factory=list)


# Maps (item, step, training?) to the text whose gradient the editor sees; InstructEdit wraps it.
EditText = Callable[[TrainItem, int, bool], str]


def _plain(item: TrainItem, _step: int, _train: bool) -> str:
    return item.request.text


# ---------------------------------------------------------------------------------------------
# forward from a cached layer input


class TopForward:
    """Final hidden states of rows, running only layers `first`.. from each row's cached layer input."""

    def __init__(self, model: Any, first: int) -> None:
        self.model, self.first = model, first
        arch = arch_for(model)
        container, _, _ = arch.layer_tmp.rpartition(".")  # "model.layers"
        self.owner_name, _, self.attr = container.rpartition(".")
        self.layers = get_module(model, container)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        config = model.config
        self.enabled = (arch.model_type in _TOP_TYPES
                        and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
                        and getattr(config, "_attn_implementation", "eager") in ("eager", "sdpa"))

    @torch.no_grad()
    def _fill(self, rows: Rows) -> None:
        keys = [tuple(r[m.bool()].tolist()) for r, m in zip(rows.ids.cpu(), rows.mask.cpu(), strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if not todo:
            return
        captured: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = self.layers[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            idx = torch.tensor(todo, device=rows.ids.device)
            self.model.base_model(input_ids=rows.ids[idx], attention_mask=rows.mask[idx], use_cache=False)
        finally:
            handle.remove()
        for j, i in enumerate(todo):
            self.cache[keys[i]] = captured[0][j, : len(keys[i])].clone()

    @contextlib.contextmanager
    def _top_layers(self) -> Iterator[None]:
        owner = get_module(self.model, self.owner_name) if self.owner_name else self.model
        full = getattr(owner, self.attr)
        setattr(owner, self.attr, nn.ModuleList(list(full)[self.first:]))
        try:
            yield
        finally:
            setattr(owner, self.attr, full)

    def __call__(self, rows: Rows) -> torch.Tensor:
        if not self.enabled:
            return self.model.base_model(input_ids=rows.ids, attention_mask=rows.mask, use_cache=False)[0]
        self._fill(rows)
        b, t = rows.ids.shape
        first = next(iter(self.cache.values()))
        h = torch.zeros(b, t, first.shape[-1], dtype=first.dtype, device=first.device)
        for r in range(b):
            key = tuple(rows.ids[r][rows.mask[r].bool()].tolist())
            h[r, : len(key)] = self.cache[key]
        with self._top_layers():
            return self.model.base_model(inputs_embeds=h, attention_mask=rows.mask, use_cache=False)[0]


# ---------------------------------------------------------------------------------------------
# one batch of edits


@dataclass
class _Prepared:
    """Token ids of one item: the edit row, the loss rows (prompt, paraphrases), the locality row."""

    target: list[int]
    prompts: list[list[int]]  # plain prompt, then paraphrases
    loc: tuple[list[int], list[int]]


def _locality(items: Sequence[TrainItem], i: int) -> tuple[str, str]:
    """The item's own unrelated fact, a neighbour with its true answer, or another item's fact."""
    r = items[i].request
    if r.locality:
        return r.locality[0]
    if r.neighbourhood and r.target_true:
        return r.neighbourhood[0], r.target_true
    for k in range(1, len(items)):
        other = items[(i + k * 7919) % len(items)].request
        if other.subject != r.subject:
            return other.text, other.target_true or other.target_new
    raise ValueError("locality needs another fact: give at least two training records with different subjects")


def _prepare(tok: Any, items: Sequence[TrainItem], params: MENDTrainParams) -> list[_Prepared | None]:
    out: list[_Prepared | None] = []
    for i, item in enumerate(items):
        r = item.request
        target = answer_ids(tok, r.target_new)
        prompts = [prompt_ids(tok, p) for p in (r.text, *r.paraphrases[: params.n_paraphrases])]
        lp, la = _locality(items, i)
        loc = (prompt_ids(tok, lp), answer_ids(tok, la))
        too_long = max(len(p) for p in prompts) + len(target) > params.max_length or \
            len(loc[0]) + len(loc[1]) > params.max_length
        out.append(None if too_long else _Prepared(target, prompts, loc))
    return out


@dataclass
class _BatchResult:
    loss: torch.Tensor
    edit_nll: float
    loc_kl: float
    edit_acc: list[float]  # per item: token accuracy on its plain prompt
    gen_acc: list[float]  # per paraphrase
    loc_agree: list[float]  # per item


def _kl(base_logp: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_base ‖ p_new)."""
    new_logp = new_logits.float().log_softmax(-1)
    return (base_logp.exp() * (base_logp - new_logp)).sum(-1).mean()


def run_batch(model: Any, tok: Any, editor: MENDEditor, params: MENDTrainParams, forward: TopForward,
              batch: Sequence[tuple[_Prepared, list[int]]], *, train: bool) -> _BatchResult:
    """Edit with every (prepared item, edit prompt ids) of `batch` at once; losses and scores."""
    device = model.get_input_embeddings().weight.device
    pad = next(int(t) for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
    n = len(batch)
    modules = [get_module(model, name) for name in params.modules]
    # pass 1: the unedited model on the edit rows (gradient) and the locality rows (reference)
    rows1 = make_rows([(e, p.target) for p, e in batch] + [p.loc for p, _ in batch], pad, device)
    with frozen(model), torch.enable_grad(), capture_hooks(modules) as (inputs, outputs):
        logits1 = head_logits(model, forward(rows1), rows1)
        is_edit = rows1.rows < n
        nll = torch.nn.functional.cross_entropy(logits1[is_edit].float(), rows1.labels[is_edit], reduction="none")
        per_row = torch.zeros(n, device=device).index_add(0, rows1.rows[is_edit], nll)
        edit_loss = (per_row / torch.bincount(rows1.rows[is_edit], minlength=n).clamp(min=1)).sum()
        grads = torch.autograd.grad(edit_loss, outputs)
    base_logp = logits1[~is_edit].detach().float().log_softmax(-1)
    pairs = [nonzero_tokens(u.float(), d.float()) for u, d in zip(inputs, grads, strict=True)]
    factors = Factors([u for u, _ in pairs], [d for _, d in pairs])
    with torch.set_grad_enabled(train):
        edited = transform(editor, factors, observe=train)
        # pass 2: the edited model on the prompts, paraphrases and locality rows
        loss_seqs = [(q, p.target) for p, _ in batch for q in p.prompts]
        rows2 = make_rows(loss_seqs + [p.loc for p, _ in batch], pad, device)
        with frozen(model), delta_hooks(model, params, edited, editor.step):
            logits2 = head_logits(model, forward(rows2), rows2)
        n_loss = len(loss_seqs)
        is_loss = rows2.rows < n_loss
        nll2 = torch.nn.functional.cross_entropy(logits2[is_loss].float(), rows2.labels[is_loss], reduction="none")
        counts = torch.bincount(rows2.rows[is_loss], minlength=n_loss).clamp(min=1)
        row_nll = torch.zeros(n_loss, device=device).index_add(0, rows2.rows[is_loss], nll2) / counts
        l_edit = row_nll.mean()
        l_loc = _kl(base_logp, logits2[~is_loss])
        loss = params.cedit * l_edit + params.cloc * l_loc
    with torch.no_grad():
        hit = (logits2[is_loss].argmax(-1) == rows2.labels[is_loss]).float()
        row_acc = (torch.zeros(n_loss, device=device).index_add(0, rows2.rows[is_loss], hit) / counts).tolist()
        agree = (logits2[~is_loss].argmax(-1) == base_logp.argmax(-1)).float()
        loc_rows = rows2.rows[~is_loss] - n_loss
        loc_acc = (torch.zeros(n, device=device).index_add(0, loc_rows, agree)
                   / torch.bincount(loc_rows, minlength=n).clamp(min=1)).tolist()
    starts = [0]
    for p, _ in batch:
        starts.append(starts[-1] + len(p.prompts))
    edit_acc = [row_acc[s] for s in starts[:-1]]
    gen_acc = [a for s, e in itertools.pairwise(starts) for a in row_acc[s + 1 : e]]
    return _BatchResult(loss, float(l_edit.detach()), float(l_loc.detach()), edit_acc, gen_acc, loc_acc)


# ---------------------------------------------------------------------------------------------
# the loop


# Candidate initial steps for the line search (edit_lr = 0): the right scale differs by orders of
# magnitude between models (MEND's configs: 1e-4 to 1e-3 for GPT-2 XL and GPT-J).
STEP_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


@torch.no_grad()
def line_search_step(model: Any, tok: Any, editor: MENDEditor, params: MENDTrainParams, forward: TopForward,
                     batch: Sequence[tuple[_Prepared, list[int]]]) -> float:
    """The initial α with the lowest training loss on one batch for the untrained editor (one step
    of gradient descent: it is the identity), the locality KL included so that no step is too large."""
    losses = {}
    for a in STEP_GRID:
        editor.step.fill_(a)
        res = run_batch(model, tok, editor, params, forward, batch, train=False)
        losses[a] = float(res.loss) if math.isfinite(float(res.loss)) else math.inf
    best = min(losses, key=losses.__getitem__)
    editor.step.fill_(best)
    log.info("initial step %g (training loss of one gradient step: %s)", best,
             ", ".join(f"{a:g}: {v:.3f}" for a, v in losses.items()))
    return best


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def validate(model: Any, tok: Any, editor: MENDEditor, params: MENDTrainParams, forward: TopForward,
             items: Sequence[TrainItem], prepared: Sequence[_Prepared], edit_text: EditText,
             step: int) -> dict[str, float]:
    """Single edits, as at edit time: losses, reliability, generalization and locality."""
    losses, nlls, kls, rel, gen, loc = [], [], [], [], [], []
    editor.eval()
    for item, prep in zip(items, prepared, strict=True):
        res = run_batch(model, tok, editor, params, forward,
                        [(prep, prompt_ids(tok, edit_text(item, step, False)))], train=False)
        losses.append(float(res.loss))
        nlls.append(res.edit_nll)
        kls.append(res.loc_kl)
        rel += res.edit_acc
        gen += res.gen_acc
        loc += res.loc_agree
    editor.train()
    return {"loss": _mean(losses), "edit_nll": _mean(nlls), "loc_kl": _mean(kls), "reliability": _mean(rel),
            "generalization": _mean(gen), "locality": _mean(loc)}


def _batch_order(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Item indices of a step: epochs are seeded permutations laid end to end."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def _opt_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"{prefix}.{idx}.{k}": v for idx, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_opt(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def train(model: Any, tok: Any, items: Sequence[TrainItem], val_items: Sequence[TrainItem],
          params: MENDTrainParams, *, checkpoint: Checkpoint | None = None, edit_text: EditText = _plain,
          progress: ProgressFn = no_progress, extra_config: dict[str, Any] | None = None) -> TrainedEditor:
    """Train an editor for `model` on `items`, validating on `val_items`; returns the best state."""
    torch.manual_seed(params.seed)
    device = model.get_input_embeddings().weight.device
    editor = build_editor(params, module_shapes(model, params)).to(device).train()
    opt = torch.optim.Adam(editor.editor_parameters(), lr=params.lr)
    opt_lr = torch.optim.Adam([editor.step], lr=params.lr_lr)
    prepared = _prepare(tok, items, params)
    train_idx = [i for i, p in enumerate(prepared) if p is not None]
    val_prepared = _prepare(tok, val_items, params)
    val_pairs = [(it, p) for it, p in zip(val_items, val_prepared, strict=True) if p is not None]
    if len(train_idx) < 2:
        raise ValueError(f"{len(train_idx)} usable training records (rows longer than max_length="
                         f"{params.max_length} tokens are dropped); at least 2 are needed")
    if not val_pairs:
        raise ValueError("no usable validation records")
    step, best, bad, elapsed, history, initial_step = 0, math.inf, 0, 0.0, [], params.edit_lr
    best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}
    best_metrics: dict[str, Any] = {}
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        tensors, state = saved
        editor.load_state_dict({k[len("editor."):]: v for k, v in tensors.items() if k.startswith("editor.")})
        best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        _load_opt("opt", opt, tensors, state["opt_groups"])
        _load_opt("optlr", opt_lr, tensors, state["optlr_groups"])
        step, best, bad, elapsed = state["step"], state["best"], state["bad"], state["elapsed"]
        history, best_metrics, initial_step = state["history"], state["best_metrics"], state["initial_step"]
        log.info("resuming from the checkpoint at step %d (%.0f s of training done)", step, elapsed)
    forward = TopForward(model, min(params.layers))
    if not forward.enabled:
        log.info("model_type %r: every step runs the whole model", model.config.model_type)

    def batch_at(step: int) -> list[tuple[_Prepared, list[int]]]:
        order = [train_idx[k] for k in _batch_order(len(train_idx), step, params.batch_size, params.seed)]
        return [(prepared[i], prompt_ids(tok, edit_text(items[i], step, True))) for i in order]  # type: ignore[misc]

    if step == 0 and not params.edit_lr:
        initial_step = line_search_step(model, tok, editor, params, forward, batch_at(0))
        best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}

    def save() -> None:
        if checkpoint is None:
            return
        t1, g1 = _opt_tensors("opt", opt)
        t2, g2 = _opt_tensors("optlr", opt_lr)
        tensors = {**{f"editor.{k}": v for k, v in editor.state_dict().items()},
                   **{f"best.{k}": v for k, v in best_state.items()}, **t1, **t2}
        checkpoint.save(tensors, {"step": step, "best": best, "bad": bad, "elapsed": elapsed, "history": history,
                                  "best_metrics": best_metrics, "initial_step": initial_step,
                                  "opt_groups": g1["param_groups"],
                                  "optlr_groups": g2["param_groups"]})

    stopped = "max_steps"
    bar = progress(total=params.max_steps, initial=step, desc="training editor", unit="step")
    started = time.perf_counter() - elapsed
    while True:
        if bad >= params.patience:
            stopped = "early_stopping"
            break
        if step >= params.max_steps:
            break
        if params.max_minutes and time.perf_counter() - started >= params.max_minutes * 60:
            stopped = "max_minutes"
            break
        res = run_batch(model, tok, editor, params, forward, batch_at(step), train=True)
        opt.zero_grad()
        opt_lr.zero_grad()
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), params.grad_clip)
        opt.step()
        opt_lr.step()
        step += 1
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{float(res.loss.detach()):.3f}", nll=f"{res.edit_nll:.3f}", kl=f"{res.loc_kl:.4f}")
        if step % params.val_every == 0 or step == params.max_steps:
            metrics = validate(model, tok, editor, params, forward, [it for it, _ in val_pairs],
                               [p for _, p in val_pairs], edit_text, step)
            elapsed = time.perf_counter() - started
            metrics.update({"step": step, "seconds": round(elapsed, 1)})
            history.append(metrics)
            if metrics["loss"] < best - 1e-4:
                best, bad, best_metrics = metrics["loss"], 0, metrics
                best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}
            else:
                bad += 1
            log.info("step %d: val loss %.4f  reliability %.3f  generalization %.3f  locality %.3f%s", step,
                     metrics["loss"], metrics["reliability"], metrics["generalization"], metrics["locality"],
                     "" if bad else " (best)")
            save()
        elif step % params.checkpoint_every == 0:
            save()
    bar.close()
    if not best_metrics:  # stopped before any validation: validate what there is
        best_metrics = validate(model, tok, editor, params, forward, [it for it, _ in val_pairs],
                                [p for _, p in val_pairs], edit_text, step)
        best_metrics.update({"step": step, "seconds": round(elapsed, 1)})
        best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}
    save()
    config = {"shapes": [list(s) for s in editor.shapes], "params": _params_dict(params), **(extra_config or {})}
    metrics = {**{f"val_{k}": v for k, v in best_metrics.items() if k not in ("step", "seconds")},
               "best_step": best_metrics.get("step"), "steps": step, "train_seconds": round(elapsed, 1),
               "stopped": stopped, "n_train": len(train_idx), "n_val": len(val_pairs),
               "initial_step": initial_step, "learned_steps": [round(float(x), 6) for x in best_state["step"]]}
    return TrainedEditor({k: v.cpu() for k, v in best_state.items()}, config, metrics, history)


def _params_dict(params: MENDTrainParams) -> dict[str, Any]:
    from kedit.methods.hparams import hparams_to_dict

    return json.loads(json.dumps(hparams_to_dict(params)))
