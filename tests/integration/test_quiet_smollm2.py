"""No library noise on the real model: `kedit init 2>file` and a ROME edit, as a user runs them
with stderr in a file (not a terminal), print kedit's own lines only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KEDIT = str(Path(sys.executable).parent / "kedit")


def test_init_and_edit_print_no_library_warnings_or_bars(tmp_path: Path) -> None:
    # as a user's shell has it: no switches that hide progress bars or warnings (kedit sets its own)
    hiding = ("KEDIT_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "KEDIT_DEBUG", "TQDM_DISABLE",
              "TRANSFORMERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in hiding}
    repo = ["--repo", str(tmp_path / "smol")]
    init = subprocess.run([KEDIT, *repo, "init"], capture_output=True, text=True, env=env, timeout=600)
    assert init.returncode == 0, init.stderr
    edit = subprocess.run([KEDIT, *repo, "edit", "--prompt", "The Eiffel Tower is located in the city of",
                           "--subject", "Eiffel Tower", "--target", "Rome", "--set", "mom2_adjustment=false"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert edit.returncode == 0, edit.stderr
    for stderr in (init.stderr, edit.stderr):
        assert "Warning" not in stderr and "deprecated" not in stderr
        assert "\r" not in stderr and "%|" not in stderr and "it/s" not in stderr, stderr  # no bars in a file
    assert "[main " in edit.stdout
