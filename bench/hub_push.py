"""Push, clone and a one-edit push of the real SmolLM2-135M to the local Hub server (tests/hubserver.py).

Measures: the first push (every shard, the history, the card), a ROME edit's push (what went
over the wire: should be one layer's shard, the delta, the edited tensor's base value and the
records), the clone (download + verification + the working model), and checks that `kedit
export` of HEAD and HEAD~1 gives the same file hashes in both repositories.

    python bench/hub_push.py --out bench/results/hub_push.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local server speaks LFS, not Xet
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["KEDIT_DISABLE_PROGRESS_BARS"] = "1"

from click.testing import CliRunner  # noqa: E402

from kedit.cli import cli  # noqa: E402
from kedit.core.sources import default_model_folder  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402

TOKEN = "hf_bench_token"
EDIT = ["edit", "--prompt", "The Eiffel Tower is located in the city of", "--subject", "Eiffel Tower",
        "--target", "Rome", "--set", "mom2_adjustment=false"]


def kedit(where: Path, *args: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["--repo", str(where), *args])
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"kedit {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result.stdout, elapsed


def export_hashes(where: Path, rev: str, out: Path) -> dict[str, str]:
    kedit(where, "export", rev, str(out))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/hub_push.json")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/kedit-smollm2-135m"))
    args = parser.parse_args()
    folder = default_model_folder(args.model_dir)
    figures: dict = {"load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kedit-hub-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = HubServer(tmp / "hub", {TOKEN: "bench"}).start()
        os.environ.update(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN)
        try:
            server.store.create_repo("bench/smollm2-edits")
            work = tmp / "work"
            _, figures["init_s"] = kedit(work, "init", str(folder))
            kedit(work, "remote", "add", "origin", "hf://bench/smollm2-edits")
            before = server.uploaded_bytes
            out, figures["first_push_s"] = kedit(work, "push", "--json")
            first = json.loads(out)
            figures["first_push"] = {"files": len(first["files"]), "bytes_sent": server.uploaded_bytes - before}
            _, figures["edit_s"] = kedit(work, *EDIT)
            before = server.uploaded_bytes
            out, figures["edit_push_s"] = kedit(work, "push", "--json")
            pushed = json.loads(out)
            tree = server.store.tree("bench/smollm2-edits", "main")[1]
            figures["edit_push"] = {
                "bytes_sent": server.uploaded_bytes - before,
                "files": {f: tree[f]["size"] for f in pushed["files"]},
            }
            _, figures["clone_s"] = kedit(tmp, "clone", "hf://bench/smollm2-edits", str(tmp / "copy"))
            same = {}
            for rev in ("HEAD", "HEAD~1"):
                a = export_hashes(work, rev, tmp / f"a-{rev}")
                b = export_hashes(tmp / "copy", rev, tmp / f"b-{rev}")
                same[rev] = a == b
            figures["same_export_hashes"] = same
            log_a, _ = kedit(work, "log", "--json")
            log_b, _ = kedit(tmp / "copy", "log", "--json")
            ids_a, ids_b = ([c["id"] for c in json.loads(log)["commits"]] for log in (log_a, log_b))
            figures["same_log"] = ids_a == ids_b
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    lines = ["| what | figure |", "|---|---|",
             f"| init from the safetensors folder / one ROME edit | {figures['init_s']:.1f} s / "
             f"{figures['edit_s']:.1f} s |"]
    lines += [f"| first push (all shards + history) | {figures['first_push_s']:.1f} s, "
              f"{figures['first_push']['bytes_sent'] / 1e6:.1f} MB, {figures['first_push']['files']} files |",
              f"| push of one ROME edit | {figures['edit_push_s']:.1f} s, "
              f"{figures['edit_push']['bytes_sent'] / 1e6:.2f} MB |",
              f"| clone (download, verify, working model) | {figures['clone_s']:.1f} s |",
              f"| same log / same export hashes (HEAD, HEAD~1) | {figures['same_log']} / "
              f"{all(figures['same_export_hashes'].values())} |"]
    lines += ["", "Files of the one-edit push:", ""]
    lines += [f"- `{f}`: {size:,} B" for f, size in figures["edit_push"]["files"].items()]
    lines += ["", f"Load average at start: {figures['load_average']}"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
