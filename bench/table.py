"""Generate the README's benchmark table from ``bench/results/*.json``.

    python -m bench.table            # rewrite the table between the markers in README.md
    python -m bench.table --check    # exit 1 when README.md's table differs from the results

The table sits between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``; one row per result file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench._common import ROOT

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) < 1:
        return f"{value:.5g}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def _machine(m: dict[str, Any] | None) -> str:
    if not m or all(v is None for v in m.values()):
        return "not recorded"
    if m.get("gpu"):
        return str(m["gpu"])
    parts = [str(m.get("cpu_model") or "CPU (model not recorded)")]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("torch_threads"):
        parts.append(f"{m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def row(result: dict[str, Any]) -> str:
    """One markdown table row for a result file's contents."""
    name = result["experiment"]
    figures = ", ".join(f"{k} {_number(v)}" for k, v in result["metrics"].items())
    source = f"converted from `{result['converted_from']}`" if result.get("converted_from") else "bench.run"
    return (f"| `{name}` | {_cell(result.get('description', ''))} | {_cell(figures)} | "
            f"{_cell(_machine(result.get('machine')))} | {source} |")


def render(results_dir: Path = RESULTS) -> str:
    """The whole table (header and one row per ``*.json`` in ``results_dir``, sorted by experiment name)."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    lines = ["| experiment | what it measures | figures | machine | result |", "|---|---|---|---|---|"]
    lines += [row(r) for r in sorted(results, key=lambda r: r["experiment"])]
    return "\n".join(lines)


def update_readme(text: str, results_dir: Path = RESULTS) -> str:
    """``text`` with the part between the markers replaced by :func:`render`'s table."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md needs one {START} line followed by one {END} line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{render(results_dir)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = update_readme(text)
    if args.check:
        if new != text:
            sys.stderr.write("README.md's benchmark table is stale: run python -m bench.table\n")
            return 1
        return 0
    if new != text:
        README.write_text(new)
    sys.stdout.write(f"{README}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
