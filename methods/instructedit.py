"""InstructEdit (Zhang et al. 2024): one MEND editor for many kinds of edit, steered by instructions.

The editor is MEND's (methods/mend_net.py), trained on a mix of task families; the text whose gradient
the editor sees is the edit prompt wrapped as

    Task: {task}
    Description: {description}
    Input: {prompt}

Each family has several hand-written descriptions: training samples from all
but the last, and the last is kept unseen, to test instructions the editor never saw. A family
left out of the training data entirely (the paper holds out zsRE) tests unseen tasks.

The edited model is queried without instructions: the losses (edit NLL on the prompt and its
paraphrases, locality KL) are computed on the plain texts, so the instruction only conditions
the gradient the editor transforms. Unknown task names get generic descriptions.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kedit.methods.base import EditRequest, EditResult, register_method
from kedit.methods.mend_net import EditorLoader, MENDTrainParams, check_model, edit_with, load_editor
from kedit.methods.mend_train import train

__all__ = ["INSTRUCTIONS", "InstructEditHyperParams", "apply", "instruction", "wrap"]

TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}"

# Per family: descriptions; the last one is never used in training.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "counterfact": (
        "Rewrite the stored fact so that the statement ends with the new object.",
        "Change what the model believes about the subject: the completion becomes the given answer.",
        "Replace the old attribute of the subject with a counterfactual one.",
        "Update the factual association named in the input to the new target.",
        "Edit the knowledge about this entity so that the sentence is completed with the new value.",
    ),
    "zsre": (
        "Answer the question about the subject with the new answer from now on.",
        "Change the model's answer to this question about an entity.",
        "Edit the relation asked about in the question so that its answer is the given one.",
        "From now on, respond to this question with the updated fact.",
        "Make the new answer the reply to this question about the subject.",
    ),
    "sentiment": (
        "Change the model's opinion of the topic to the given sentiment.",
        "Make the model speak about this topic with the new attitude.",
        "Edit how the model feels about the subject: its judgement becomes the target word.",
        "Shift the sentiment the model expresses about this topic.",
        "From now on the model should describe this topic with the given feeling.",
    ),
    "recent": (
        "Insert this recent fact about the subject, which the model has not seen.",
        "Teach the model the new information about the entity.",
        "Add the latest knowledge about the subject to the model.",
        "Update the model with a fact that changed recently.",
        "Write this new, up-to-date fact about the entity into the model.",
    ),
}
_GENERIC = (
    "Edit the model so that the input is completed with the new target.",
    "Change the model's knowledge so that it gives the requested answer.",
    "Apply this edit to the model's knowledge.",
    "Make the model produce the target after this input.",
    "Write the requested change into the model.",
)
TASK_NAMES = {"convsent": "sentiment", "wikirecent": "recent", "wiki_recent": "recent", "cf": "counterfact"}


def _descriptions(task: str) -> tuple[str, ...]:
    return INSTRUCTIONS.get(TASK_NAMES.get(task, task), _GENERIC)


def instruction(task: str, index: int) -> str:
    """Description `index` of a task (-1: the one kept out of training)."""
    descriptions = _descriptions(task)
    if not -len(descriptions) <= index < len(descriptions):
        raise ValueError(f"task {task!r} has {len(descriptions)} instructions; index {index} is out of range")
    return descriptions[index]


def wrap(task: str, description: str, prompt: str) -> str:
    return TEMPLATE.format(task=TASK_NAMES.get(task, task), description=description, prompt=prompt)


def training_text(item: Any, step: int, train: bool) -> str:
    """A seen description (a fixed function of the step and the prompt) in training; the unseen one otherwise."""
    seen = _descriptions(item.task)[:-1]
    pick = zlib.crc32(f"{step}:{item.request.text}".encode()) % len(seen) if train else -1
    desc = seen[pick] if train else _descriptions(item.task)[-1]
    return wrap(item.task, desc, item.request.text)


@dataclass
class InstructEditHyperParams:
    """Which editor, and the instruction written in front of the edit prompt."""

    editor: str | None = None  # a stored editor id (or unique prefix); None: the latest instructedit editor
    task: str = "counterfact"  # the task family named in the instruction
    instruction: int = -1  # which description of the task (-1: the one never used in training)

    def __post_init__(self) -> None:
        if not self.task.strip():
            raise ValueError("task must not be empty")
        instruction(self.task, self.instruction)

    @classmethod
    def for_model(cls, model: Any) -> InstructEditHyperParams:
        return cls()


def apply(model: Any, tok: Any, requests: Sequence[EditRequest], hparams: InstructEditHyperParams, *,
          load_editor_fn: EditorLoader | None = None) -> EditResult:
    if not requests:
        raise ValueError("no requests")
    if load_editor_fn is None or not hparams.editor:
        raise ValueError("InstructEdit needs a trained editor: run "
                         "'kedit train-editor --method instructedit --data FILE...' first")
    t0 = time.perf_counter()
    editor, params, _ = load_editor(load_editor_fn, hparams.editor, "instructedit")
    check_model(model, params, editor)
    desc = instruction(hparams.task, hparams.instruction)
    texts = [wrap(hparams.task, desc, r.text) for r in requests]
    deltas, info = edit_with(model, tok, requests, editor, params, texts)
    info.update({"editor": hparams.editor, "task": hparams.task, "instruction": desc, "wrapped_prompts": texts,
                 "method_seconds": round(time.perf_counter() - t0, 3)})
    return EditResult(deltas=deltas, info=info)


def _train(model: Any, tok: Any, items: Any, val_items: Any, params: MENDTrainParams, **kwargs: Any) -> Any:
    tasks = sorted({it.task for it in items})
    return train(model, tok, items, val_items, params, edit_text=training_text,
                 extra_config={"tasks": tasks, "template": TEMPLATE}, **kwargs)


register_method("instructedit", InstructEditHyperParams, apply, train=_train, train_hparams_cls=MENDTrainParams)
