"""Read edit requests from the formats users have: kedit/EasyEdit JSON(L), CounterFact,
zsRE in the MEND format, and KnowEdit. Each record becomes an `EditRequest`.

The format is recognised per record from its keys, so one file may mix them. A record that
cannot become a request raises RequestFormatError naming the file, the record and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError
from kedit.methods.base import EditRequest


class RequestFormatError(KeditError, ValueError):
    """An edit request file or record kedit cannot read."""


def load_records(path: Path) -> list[dict[str, Any]]:
    """Records of a .json file (a list, or one object) or a .jsonl file (one object a line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RequestFormatError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise RequestFormatError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from e
    try:
        if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestFormatError(f"{path} is not valid JSON or JSONL ({e})") from e
    except RecursionError:
        raise RequestFormatError(f"{path} is nested too deeply to be edit requests") from None
    return data if isinstance(data, list) else [data]


def _text(value: Any) -> str:
    """CounterFact wraps targets as {"str": ...}; lists hold aliases (take the first)."""
    if isinstance(value, dict):
        value = value.get("str", "")
    while isinstance(value, list):  # KnowEdit nests alias lists: [["Dublin"]]
        value = value[0] if value else ""
    return str(value or "").strip()


def _listed(value: Any, name: str) -> tuple:
    """A field that holds one text or a list of them, as a tuple (EditRequest checks each is text)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of texts, got {value!r:.40}")
    return tuple(value)


def _pairs(section: Any) -> tuple[tuple[str, str], ...]:
    """Locality/portability in any of the peers' shapes -> (prompt, answer) pairs.

    Prompts are kept as given (EditRequest refuses one that is not text); answers go through `_text`.
    """
    out: list[tuple[str, str]] = []
    if section is None:
        return ()
    if not isinstance(section, dict | list):
        raise ValueError(f"locality and portability must be a list or an object, got {section!r:.40}")
    if isinstance(section, dict):
        if "prompt" in section:  # EasyEdit: {"prompt": [...], "ground_truth": [...]} or scalars
            prompts, answers = section["prompt"], section.get("ground_truth", "")
            if isinstance(prompts, list):
                if not isinstance(answers, list) or len(answers) != len(prompts):
                    raise ValueError(f"{len(prompts)} prompts need as many ground_truth answers")
                out += [(p, _text(a)) for p, a in zip(prompts, answers, strict=True)]
            else:
                out.append((prompts, _text(answers)))
        else:  # KnowEdit: {"Relation_Specificity": [{"prompt", "ground_truth"}, ...], ...}
            for entries in section.values():
                out += _pairs(entries)
    elif isinstance(section, list):
        for entry in section:
            out += _pairs(entry)
    return tuple(out)


def _subject_in(prompt: str, subject: str) -> str:
    """The subject as spelled in the prompt (zsRE questions differ in case now and then)."""
    if not isinstance(prompt, str) or not isinstance(subject, str):
        return subject  # EditRequest names the field that is not text
    if subject in prompt or "{}" in prompt:
        return subject
    start = prompt.lower().find(subject.lower())
    return prompt[start:start + len(subject)] if start >= 0 else subject


def record_to_request(record: dict[str, Any]) -> EditRequest:
    if "requested_rewrite" in record:  # CounterFact
        rw = record["requested_rewrite"]
        return EditRequest(
            prompt=rw["prompt"], subject=rw["subject"], target_new=_text(rw["target_new"]),
            target_true=_text(rw.get("target_true")) or None,
            paraphrases=_listed(record.get("paraphrase_prompts"), "paraphrase_prompts"),
            neighbourhood=_listed(record.get("neighborhood_prompts"), "neighborhood_prompts"),
        )
    if "src" in record and "alt" in record:  # zsRE, MEND format
        loc = ((record["loc"], _text(record.get("loc_ans"))),) if record.get("loc") else ()
        return EditRequest(
            prompt=record["src"], subject=_subject_in(record["src"], record["subject"]),
            target_new=_text(record["alt"]), target_true=_text(record.get("answers")) or None,
            paraphrases=(record["rephrase"],) if record.get("rephrase") else (), locality=loc,
        )
    if "prompt" in record and "target_new" in record:  # kedit, EasyEdit flat, KnowEdit
        rephrase = record.get("paraphrases") or record.get("rephrase_prompt") or ()
        locality = _pairs(record.get("locality", {}))
        if record.get("locality_prompt"):
            locality += ((record["locality_prompt"], _text(record.get("locality_ground_truth"))),)
        return EditRequest(
            prompt=record["prompt"], subject=_subject_in(record["prompt"], record.get("subject", "")),
            target_new=_text(record["target_new"]),
            target_true=_text(record.get("target_true") or record.get("ground_truth")) or None,
            paraphrases=_listed(rephrase, "paraphrases"),
            neighbourhood=_listed(record.get("neighbourhood"), "neighbourhood"),
            locality=locality, portability=_pairs(record.get("portability", {})),
        )
    raise ValueError(f"unrecognised record with keys {sorted(record)[:8]}")


def record_task(record: dict[str, Any]) -> str:
    """The task family of a record: its `task` (kedit) or `type` (InstructEdit) field, else its format."""
    named = record.get("task") or record.get("type")
    if isinstance(named, str) and named.strip():
        return named.strip().lower()
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and "alt" in record:
        return "zsre"
    return "facts"


def _load(paths: Iterable[Path]) -> list[tuple[EditRequest, str]]:
    out: list[tuple[EditRequest, str]] = []
    for path in paths:
        for i, record in enumerate(load_records(path)):
            if not isinstance(record, dict):
                raise RequestFormatError(f"{path}: record {i} is not a JSON object")
            try:
                out.append((record_to_request(record), record_task(record)))
            except (KeyError, ValueError, TypeError) as e:
                raise RequestFormatError(f"{path}: record {i}: {e}") from e
    if not out:
        raise RequestFormatError("no edit requests found")
    return out


def load_requests(paths: Iterable[Path]) -> list[EditRequest]:
    return [r for r, _ in _load(paths)]


def load_training_requests(paths: Iterable[Path]) -> list[tuple[EditRequest, str]]:
    """Requests with their task family, for training an editor (MEND, InstructEdit).

    The same formats as `load_requests`; a record's paraphrases train generalization and its
    locality pairs (or CounterFact neighbourhood prompts) train locality.
    """
    return _load(paths)
