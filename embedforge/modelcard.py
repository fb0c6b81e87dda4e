"""The last step of every save: portable module code, configs older releases read, and a model card.

:func:`finish_model_dir` runs on a freshly saved model directory (inside the atomic save, so readers never see a
directory without it):

1. ship the code of embedforge's modules into the directory (:mod:`embedforge.modules.portable`);
2. rewrite the pooling and tokenizer configs in their legacy-compatible forms (:mod:`embedforge.modules.compat`);
3. write ``README.md``: what the model is, its modules, and exactly how to load it, derived from ``modules.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
LINEAGE_FILE = "embedforge.json"  # the same name embedforge.model uses; not imported, to keep this module light


def finish_model_dir(
    model_dir: str | os.PathLike[str], model: SentenceTransformer | None = None, *, name: str | None = None
) -> None:
    """Make a saved model directory load without embedforge, read on older releases, and explain itself.

    Args:
        model_dir: the directory ``model.save`` just wrote (it may still be the temporary one of an atomic save).
        model: the saved model, for the card's dimension and length (optional).
        name: the directory's final name, used in the card's loading code (default: ``model_dir``'s name).
    """
    from embedforge.modules.compat import make_legacy_compatible
    from embedforge.modules.portable import ship_module_code

    root = Path(model_dir)
    ship_module_code(root)                                                    # 1
    make_legacy_compatible(root)                                              # 2
    write_model_card(root, model, name=name or root.name)                     # 3


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _module_rows(entries: list[dict[str, Any]]) -> list[str]:
    rows = ["| # | module | folder | code |", "|---|---|---|---|"]
    for entry in entries:
        ref = entry.get("type", "")
        module, _, class_name = ref.rpartition(".")
        if ref.startswith("sentence_transformers."):
            code = "sentence-transformers"
        elif ref.startswith("embedforge."):
            code = f"`{module}` (embedforge)"
        else:
            code = f"`{module}.py` (in this directory)"
        rows.append(f"| {entry.get('idx', '')} | {class_name} | `{entry.get('path') or '.'}` | {code} |")
    return rows


def loading_instructions(entries: list[dict[str, Any]], name: str, code_files: list[str] | None = None) -> list[str]:
    """The card's "Loading" section for a model whose ``modules.json`` lists ``entries``; ``code_files`` are the
    Python files shipped in the directory (default: the files the types name)."""
    shipped = sorted(code_files or {e["type"].rpartition(".")[0] + ".py" for e in entries
                                    if not e["type"].startswith(("sentence_transformers.", "embedforge."))})
    needs_embedforge = [e["type"].rpartition(".")[2] for e in entries if e["type"].startswith("embedforge.")]
    lines = ["## Loading", ""]
    if needs_embedforge:
        lines += [
            f"The module(s) {', '.join(needs_embedforge)} need embedforge installed; load with:", "",
            "```python",
            "from embedforge.model import load_model",
            "",
            f'model = load_model("{name}")  # the path of this directory',
            'embeddings = model.encode(["A first text.", "A second one."])',
            "```",
        ]
        return lines
    trust = ", trust_remote_code=True" if shipped else ""
    lines += [
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{name}"{trust})  # the path of this directory',
        'embeddings = model.encode(["A first text.", "A second one."])',
        "```",
        "",
    ]
    if shipped:
        lines += [
            f"The custom modules' code is in this directory ({', '.join(f'`{f}`' for f in shipped)}; it needs only "
            "torch and sentence-transformers), so embedforge does not have to be installed. Read it before you "
            "pass `trust_remote_code=True`: sentence-transformers >= 6 refuses to import it without that flag. "
            "With embedforge installed, `embedforge.model.load_model(path)` loads the directory with embedforge's "
            "own classes instead, without `trust_remote_code`.",
        ]
    else:
        lines += ["All modules are sentence-transformers' own: no `trust_remote_code`, no embedforge needed."]
    return lines


def model_card(model_dir: str | os.PathLike[str], model: SentenceTransformer | None = None, *,
               name: str | None = None) -> str:
    """The text of the model card for the saved model in ``model_dir``."""
    root = Path(model_dir)
    name = name or root.name
    entries = _read_json(root / "modules.json") or []
    lineage = _read_json(root / LINEAGE_FILE) or {}
    st_config = _read_json(root / "config_sentence_transformers.json") or {}
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags:",
        "- sentence-transformers",
        "- feature-extraction",
        "- sentence-similarity",
        "- embedforge",
        "---",
        "",
        f"# {name}",
        "",
    ]
    facts = []
    if lineage:
        facts.append(f"Made by embedforge {lineage.get('embedforge_version', '')} (stage `{lineage.get('stage')}`) "
                     f"from `{lineage.get('source')}`.")
    if model is not None:
        facts.append(f"Output: {model.get_embedding_dimension()} dimensions; inputs are cut to "
                     f"{model.max_seq_length} tokens.")
    if any(e.get("type", "").endswith(".Normalize") for e in entries):
        facts.append("Vectors are L2-normalized.")
    backbone = next((root / e.get("path", "") / "config.json" for e in entries[:1]), root / "config.json")
    if (_read_json(backbone) or {}).get("is_causal") is False:
        facts.append("The decoder attends bidirectionally (`is_causal: false` in its `config.json`), which needs "
                     "transformers >= 5.2: older releases ignore the flag and attend causally, giving other vectors.")
    lines += [" ".join(facts) or "A sentence-transformers text-embedding model.", ""]
    code_files = [p.name for p in root.glob("*.py")]
    lines += loading_instructions(entries, name, code_files) + [""]
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
    if prompts:
        lines += ["## Prompts", "", "| name | text |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(v)[1:-1]}` |" for k, v in prompts.items()]
        lines += ["", f'Pass `prompt_name="{next(iter(prompts))}"` (or another name) to `encode`.', ""]
    lines += ["## Modules", "", *_module_rows(entries), ""]
    metrics = lineage.get("metrics") or {}
    scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if scalar:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in scalar.items()]
        lines += [""]
    if lineage:
        lines += [f"The full lineage (source, stages, configs) is in `{LINEAGE_FILE}`.", ""]
    return "\n".join(lines)


def write_model_card(model_dir: str | os.PathLike[str], model: SentenceTransformer | None = None, *,
                     name: str | None = None) -> Path:
    """Write ``README.md`` into ``model_dir`` (replacing the generic card sentence-transformers writes)."""
    path = Path(model_dir) / CARD_FILE
    path.write_text(model_card(model_dir, model, name=name), encoding="utf-8")
    return path
