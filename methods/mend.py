"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022).

The edit is W̃ = W − α_ℓ Σ_t δ̃_t ũ_tᵀ: the layer's inputs u_t and output gradients δ_t, mapped by
a trained editor; `mend_net.py` explains the factors and holds the network.

The editor network and the gradient factors are in `mend_net.py` (InstructEdit uses them too),
training in `mend_train.py`; here are the edit-time hyper-parameters and `apply`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kedit.methods.base import EditRequest, EditResult, register_method
from kedit.methods.mend_net import EditorLoader, MENDTrainParams, check_model, edit_with, load_editor
from kedit.methods.mend_train import train

__all__ = ["MENDHyperParams", "apply"]


@dataclass
class MENDHyperParams:
    """Edit-time knobs: which trained editor. Its structure comes with the editor."""

    editor: str | None = None  # a stored editor id (or unique prefix); None: the latest for this method

    @classmethod
    def for_model(cls, model: Any) -> MENDHyperParams:
        return cls()


def apply(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: MENDHyperParams, *,
          load_editor_fn: EditorLoader | None = None) -> EditResult:
    """Edit with the trained editor `hparams.editor` (resolved by the engine to a full id)."""
    if not requests:
        raise ValueError("no requests")
    if load_editor_fn is None or not hparams.editor:
        raise ValueError("MEND needs a trained editor: run 'kedit train-editor --method mend --data FILE' first")
    t0 = time.perf_counter()
    editor, params, _ = load_editor(load_editor_fn, hparams.editor, "mend")
    check_model(model, params, editor)
    deltas, info = edit_with(model, tok, requests, editor, params, [r.text for r in requests])
    info.update({"editor": hparams.editor, "method_seconds": round(time.perf_counter() - t0, 3)})
    return EditResult(deltas=deltas, info=info)


register_method("mend", MENDHyperParams, apply, train=train, train_hparams_cls=MENDTrainParams)
