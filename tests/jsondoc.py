"""Reading what `--json` prints: one object, its format version first (kedit/cli/jsonout.py)."""

from __future__ import annotations

import json
from typing import Any

from kedit.cli.jsonout import JSON_VERSION


def doc(text: str) -> dict[str, Any]:
    """The document's fields, once its format version is checked and taken out."""
    body = json.loads(text)
    assert isinstance(body, dict) and body.pop("kedit_json") == JSON_VERSION, text[:200]
    return body
