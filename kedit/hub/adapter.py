"""`kedit push --as-adapter`: a branch's edits as a PEFT LoRA adapter in a Hub repository.

Kilobytes instead of the whole model: the adapter `kedit export --format peft` writes
(kedit/model/peft_export.py) plus a model card naming the base model, each edit and its metrics.
`PeftModel.from_pretrained(base, repo_id)` loads it. The Hub branch (or, for a new branch, main)
must not hold a kedit history (a `.kedit/` folder that `kedit push` wrote): an adapter and a full
model do not share a repository. The commit is made with `parent_commit`, so a concurrent push is
refused, never overwritten.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kedit.core import history
from kedit.core.errors import HubError, KeditError
from kedit.core.refs import short_id
from kedit.core.repo import Repository
from kedit.hub import remotes
from kedit.hub.api import KEDIT_DIR, Hub
from kedit.hub.card import base_model_id
from kedit.hub.layout import add_file
from kedit.model.peft_export import export_peft


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def adapter_card(repo: Repository, commit_id: str, base_id: str, result: dict, *, repo_id: str,
                 base_model: str, hub_base: str | None) -> str:
    """The card: PEFT metadata, the base (`hub_base`: its Hub id, when there is one), one row per
    edit in the adapter with its metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    edits = [c for c in repo.log(commit_id) if c.depth > repo.get_commit(base_id).depth]
    methods = sorted({c.method for c in edits if c.method})
    data = ModelCardData(base_model=hub_base, library_name="peft",
                         tags=["kedit", "knowledge-editing", "lora", *methods])
    rows = []
    for c in edits:
        shown = ", ".join(f"{m.name} {m.value:.3f}" for m in c.metrics
                          if m.stage in ("post", "eval") and m.request is None) or "-"
        rows.append(f"| `{c.short}` | {c.kind} | {c.method or '-'} | {_cell(c.message)} | {shown} |")
    modules = "\n".join(f"| `{m}` | {v['rank']} | " + ("exact" if v["exact"] else f"SVD, error {v['rel_error']:.3g}")
                        + " |" for m, v in result["modules"].items())
    body = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

Knowledge edits made with kedit, as a LoRA adapter over `{base_model}`:
the weight changes from kedit commit `{short_id(base_id)}` to `{short_id(commit_id)}`, scale 1
(`lora_alpha` = rank).

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{repo_id}")
```

## Edits

| commit | kind | method | message | metrics |
|---|---|---|---|---|
{chr(10).join(rows)}

## Modules

| module | rank | |
|---|---|---|
{modules}
"""
    return str(ModelCard(body))


def push_adapter(repo: Repository, remote_name: str | None = None, branch: str | None = None, *,
                 remote_branch: str | None = None, base: str | None = None, rank: int | None = None,
                 base_model: str | None = None, create: bool = False) -> dict:
    """Upload `branch`'s edits since `base` as an adapter to the remote's `remote_branch`; returns what was sent."""
    remote = remotes.get(repo.db, remote_name)
    branch = branch or repo.head_branch()
    if branch is None:
        raise KeditError("HEAD is detached: name the branch to push", hint="kedit push origin BRANCH --as-adapter")
    commit_id = repo.resolve(branch)
    rbranch = remote_branch or branch
    root = repo.get_commit(history.ancestors(repo.db, commit_id)[-1])
    hub_base = base_model or (base_model_id(repo, root) if base is None else None)
    hub = Hub(remote)
    if create:
        hub.create_repo()
    hub_branches = hub.branches()
    parent = hub_branches.get(rbranch) or hub_branches.get("main")
    if parent is None:
        raise HubError(f"{hub.where} has no branch {rbranch!r} and no main branch to start it from")
    if hub.tree(parent, KEDIT_DIR):  # a new branch would start from it, history and all
        where = rbranch if rbranch in hub_branches else "main"
        raise KeditError(f"{remote.name}/{where} holds a kedit history; an adapter needs a repository of its own",
                         hint="kedit remote add NAME hf://OWNER/NEW-REPO, then kedit push NAME --as-adapter --create")
    with tempfile.TemporaryDirectory(prefix="kedit-adapter-") as tmp:
        folder = Path(tmp) / "adapter"
        result = export_peft(repo, commit_id, folder, base=base, rank=rank, base_name=base_model)
        name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        card = adapter_card(repo, commit_id, result["base"], result, repo_id=remote.repo_id, base_model=name,
                            hub_base=hub_base)
        ops = [add_file(n, folder / n) for n in result["files"]] + [add_file("README.md", card.encode())]
        if rbranch not in hub_branches:
            hub.create_branch(rbranch, parent)
        message = f"kedit adapter {short_id(result['base'])}..{short_id(commit_id)}"
        hub_commit = hub.commit(ops, branch=rbranch, parent=parent, message=message)
    return {"remote": remote.name, "branch": branch, "remote_branch": rbranch, "commit": commit_id,
            "base": result["base"], "hub_commit": hub_commit, "files": [*result["files"], "README.md"],
            "bytes": result["bytes"] + len(card.encode()), "rank": result["rank"], "exact": result["exact"]}
