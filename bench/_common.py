"""What the benchmark runner and the scripts under ``bench/dev/`` share: atomic JSON files, the machine, the commit.

Imported as ``bench._common``: run the scripts as modules from the repository root (``python -m bench.dev.x``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

#: The repository root (``bench/`` sits directly under it).
ROOT = Path(__file__).resolve().parent.parent


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(out_dir: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out_dir/results.json`` atomically (the scripts' own output file)."""
    write_json(Path(out_dir) / "results.json", result)


def config_hash(data: Any) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys), first 16 hex digits."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit(root: Path = ROOT) -> str | None:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it; ``None`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads and GPU of this machine (torch imported here, if installed)."""
    info: dict[str, Any] = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "torch_threads": None, "gpu": None}
    try:
        import torch
    except ImportError:
        return info
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
