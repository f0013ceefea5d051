"""The model card a push writes: base model, the edit history with each commit's metrics, and
the latest commit's measurements as eval results (model-index), rendered with huggingface_hub's
ModelCard so that the Hub's metadata validator accepts it."""

from __future__ import annotations

from kedit.core import history
from kedit.core.refs import short_id
from kedit.core.repo import CommitInfo, Repository
from kedit.core.sources import DEFAULT_GGUF, DEFAULT_NAME

MAX_ROWS = 100
EMBEDDED_BASE = f"HuggingFaceTB/{DEFAULT_NAME}"


def base_model_id(repo: Repository, root: CommitInfo) -> str | None:
    """The Hub id of the base model, when the initial commit says where it came from."""
    origin = root.info.get("origin", {})
    if origin.get("model_id"):
        return origin["model_id"]
    if origin.get("file") == DEFAULT_GGUF:
        return EMBEDDED_BASE
    return None


def _metrics(commit: CommitInfo) -> str:
    shown = [m for m in commit.metrics if m.stage in ("post", "eval") and m.request is None]  # the whole commit's
    return ", ".join(f"{m.name} {m.value:.3f}" for m in shown) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def render(repo: Repository, tip: str, *, repo_id: str, base_model: str | None) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    log = repo.log(tip)
    root = log[-1]
    base_model = base_model or base_model_id(repo, root)
    methods = sorted({c.method for c in log if c.method})
    latest = [m for m in log[0].metrics if m.stage in ("post", "eval") and m.request is None]
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        model_name=name, base_model=base_model, library_name="transformers",
        tags=["kedit", "knowledge-editing", *methods],
        eval_results=[EvalResult(task_type="text-generation", dataset_type="kedit-edit-requests",
                                 dataset_name="edit requests and probes of this history", metric_type=m.name,
                                 metric_value=round(m.value, 6), metric_name=f"{m.name} ({m.protocol})")
                      for m in latest] or None,
    )
    if base_model:
        data.base_model_relation = "finetune"
    rows = [f"| `{c.short}` | {c.kind} | {c.method or '-'} | {_cell(c.message)} | {_metrics(c)} |"
            for c in log[:MAX_ROWS]]
    more = f"\n\n…and {len(log) - MAX_ROWS} earlier commits." if len(log) > MAX_ROWS else ""
    kinds = sorted({a.kind for a in history.adapters(repo.db, tip)})
    adapters = f"""
**Load this model with kedit.** Its edits include adapters ({", ".join(kinds)}) that transformers
cannot apply, so `AutoModelForCausalLM.from_pretrained` refuses this folder rather than load the
unedited model. Use:

```python
import kedit
from huggingface_hub import snapshot_download
model = kedit.load_model(snapshot_download("{repo_id}", ignore_patterns=[".kedit/*"]))
```
""" if kinds else ""
    body = f"""
# {name}

{base_model or 'A model'} with {len(log) - 1} knowledge edit(s), versioned with kedit ("git for model
edits"). The weights here are commit `{short_id(tip)}`.
{adapters}
The whole history (every delta, request and metric) is under `.kedit/`; get it with:

```sh
kedit clone hf://{repo_id}
```

## Edit history (newest first)

| commit | kind | method | message | metrics |
|---|---|---|---|---|
{chr(10).join(rows)}{more}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
