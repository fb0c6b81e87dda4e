"""What the benchmark scripts share: writing ``results.json`` so that a stopped run never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_results(out_dir: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out_dir/results.json`` through a temporary file and a rename."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / "results.json")
