"""Commands between a model folder and a repository: init (repository from a model), export (revision to a folder)."""

from __future__ import annotations

from pathlib import Path

import click

from kedit.cli.common import command, human_bytes, json_option, open_repo, parse_size, ref_decorations, say
from kedit.cli.jsonout import commit_json, emit_json
from kedit.core.names import DTYPE_NAMES
from kedit.core.progress import progress_enabled
from kedit.core.refs import short_id


@command()
@click.argument("model", required=False)
@click.option("--no-copy", is_flag=True, help="Keep a verified reference to the safetensors files instead of a copy.")
@click.option("--bare", is_flag=True, help="No working model folder (.kedit/worktree).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPE_NAMES]), default="auto", show_default=True,
              help="Store the base in this dtype.")
@click.option("-m", "--message", help="Message of the initial commit.")
@click.option("--add-base", is_flag=True,
              help="Add MODEL to this repository as another base (a root commit on a branch of its own).")
@click.option("--branch", help="--add-base: the new base's branch (default base-N).")
@json_option
@click.pass_context
def init(ctx: click.Context, model: str | None, no_copy: bool, bare: bool, dtype: str, message: str | None,
         add_base: bool, branch: str | None, as_json: bool) -> None:
    """Make MODEL a repository: hash every tensor and store the base.

    MODEL is a Hugging Face folder, a .safetensors file, a .gguf file or a model id in the
    local Hugging Face cache; without it, the embedded SmolLM2-135M-Instruct. With --add-base,
    MODEL (same tensor names and shapes) becomes a second base of the existing repository, for
    `kedit rebase --onto`; tensors equal to stored ones are shared.

    \b
    Example:
        kedit init                       # embedded default
        kedit init ./my-model --no-copy  # reference the safetensors in place
        kedit init --add-base ./my-model-v1.1 --branch v1.1
    """
    from kedit.model.load import parse_dtype
    from kedit.repository import Repository

    if branch is not None and not add_base:
        raise click.UsageError("--branch goes with --add-base")
    torch_dtype = parse_dtype(dtype)
    if add_base:
        if bare:
            raise click.UsageError("--bare is a property of a new repository, not of an added base")
        repo = open_repo(ctx)
        name, head = repo.add_base(model, branch=branch, copy=not no_copy, dtype=torch_dtype,
                                   progress=progress_enabled(), message=message)
    else:
        repo = Repository.init(ctx.obj["repo_path"], model, copy=not no_copy, worktree=not bare, dtype=torch_dtype,
                               progress=progress_enabled(), message=message)
        head, name = repo.log(limit=1)[0], repo.head_branch()
    manifest = repo.manifest(head.id)
    total = sum(e.nbytes for e in manifest.values())
    if as_json:
        emit_json(path=str(repo.path), branch=name,
                  commit=commit_json(head, ref_decorations(repo).get(head.id)), tensors=len(manifest), bytes=total)
        return
    say(ctx, f"Added a base to {repo.path}" if add_base else f"Initialised kedit repository in {repo.path}")
    click.echo(f"[{name} {head.short}] {head.message}: {len(manifest)} tensors, {human_bytes(total)}")



@command()
@click.argument("rev")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hf", "peft", "gguf"]), default="hf", show_default=True,
              help="hf: a full checkpoint folder; peft: the edits from --base as a LoRA adapter; "
                   "gguf: one file for llama.cpp.")
@click.option("--quant", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]),
              help="gguf: the matrices' type (default: a GGUF base's own types, else f16).")
@click.option("--base", help="peft: the revision the adapter applies to (default: the initial commit).")
@click.option("--rank", type=int, help="peft: truncate dense deltas (FT-L) to this rank by SVD.")
@click.option("--base-name", help="peft: base_model_name_or_path to write (default: the model kedit was made from).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Split weights into shards above this.")
@click.option("-f", "--force", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@json_option
@click.pass_context
def export(ctx: click.Context, rev: str, directory: Path, fmt: str, quant: str | None, base: str | None,
           rank: int | None, base_name: str | None, max_shard_size: str, force: bool, as_json: bool) -> None:
    """Write REV as a normal checkpoint folder that transformers loads without kedit, (--format
    peft) the weight edits since --base as a PEFT LoRA adapter, or (--format gguf) a GGUF file.

    \b
    Example:
        kedit export HEAD ./edited-model
        python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('./edited-model')"
        kedit export HEAD ./edits-lora --format peft
        kedit export HEAD ./edited.gguf --format gguf --quant q8_0
    """
    for name, value, only in (("--base", base, "peft"), ("--rank", rank, "peft"), ("--base-name", base_name, "peft"),
                              ("--quant", quant, "gguf")):
        if value is not None and fmt != only:
            raise click.UsageError(f"{name} applies to --format {only} only")
    if fmt == "peft":
        _export_peft(ctx, rev, directory, base=base, rank=rank, base_name=base_name, force=force, as_json=as_json)
        return
    if fmt == "gguf":
        _export_gguf(ctx, rev, directory, quant=quant, force=force, as_json=as_json)
        return
    from kedit.model.export import export as run_export

    repo = open_repo(ctx)
    result = run_export(repo, rev, directory, max_shard_bytes=parse_size(max_shard_size), force=force,
                        progress=progress_enabled())
    if as_json:
        emit_json(**result)
    else:
        click.echo(f"exported {short_id(result['commit'])} to {result['path']} "
                   f"({result['tensors']} tensors in {len(result['shards'])} shard(s))")
        if result.get("adapters"):
            click.echo(f"with {result['adapters']} adapter(s): load it with kedit.load_model(path); "
                       "plain from_pretrained refuses it")


def _export_peft(ctx: click.Context, rev: str, directory: Path, *, base: str | None, rank: int | None,
                 base_name: str | None, force: bool, as_json: bool) -> None:
    from kedit.model.peft_export import export_peft

    result = export_peft(open_repo(ctx), rev, directory, base=base, rank=rank, base_name=base_name, force=force)
    if as_json:
        emit_json(**result)
        return
    click.echo(f"exported the edits {short_id(result['base'])}..{short_id(result['commit'])} to {result['path']} "
               f"as a LoRA adapter: {len(result['modules'])} module(s), total rank {result['rank']}, "
               f"{human_bytes(result['bytes'])}")
    if not result["exact"]:
        click.echo(f"truncated by SVD: relative error up to {result['max_rel_error']:.3g} of a delta")


def _export_gguf(ctx: click.Context, rev: str, file: Path, *, quant: str | None, force: bool, as_json: bool) -> None:
    from kedit.model.gguf_export import export_gguf

    result = export_gguf(open_repo(ctx), rev, file, quant=quant, force=force)
    if as_json:
        emit_json(**result)
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(result["types"].items()))
    click.echo(f"exported {short_id(result['commit'])} to {result['path']} ({human_bytes(result['bytes'])}; "
               f"{types}; metadata from {'the source GGUF file' if result['metadata'] == 'source' else 'config.json'})")
