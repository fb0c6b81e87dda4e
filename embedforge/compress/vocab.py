"""Vocabulary pruning: keep only the tokens a corpus uses; rebuild tokenizer and embedding matrix together.

LLM vocabularies are a large share of a small model's parameters (SmolLM2-135M: 49,152 x 576 = 28 M of 135 M).
On a target corpus most of those rows are never used. :func:`prune_vocabulary` tokenizes the corpus, keeps the
used ids plus everything the tokenizer needs to reproduce them, renumbers the kept tokens (old order preserved),
rewrites ``tokenizer.json`` with the new ids and slices the input embedding matrix to match.

Why the pruned tokenizer produces the same tokens on the corpus:

* WordPiece (greedy longest match): every piece the original picked is kept and nothing longer is added.
* BPE: merges are kept (in their original rank order) only when both inputs and the output are kept, and every
  kept token's own merge inputs are kept recursively, so a corpus word goes through the same merges; byte-level
  tokenizers also keep their 256 single-byte tokens, so unseen text still tokenizes.
* Unigram: the original best segmentation is still available and every alternative was already available before.

Texts outside the corpus may tokenize differently (more pieces or ``unk``); that is the trade-off.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)


def corpus_token_ids(tokenizer: Any, texts: Iterable[str], batch_size: int = 512, model: Any = None) -> set[int]:
    """Every token id the tokenizer produces on ``texts`` (special tokens included).

    With ``model`` (a SentenceTransformer), the texts also go through the model's own preprocessing — chat
    template, and each of its prompts — so that tokens the model adds around a text are kept too.
    """
    used: set[int] = set()
    prompts = [""] + [p for p in (getattr(model, "prompts", None) or {}).values() if p] if model is not None else []

    def add(batch: list[str]) -> None:
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            used.update(ids)
        for prompt in prompts:
            feats = model.preprocess([prompt + t for t in batch])
            ids = feats["input_ids"]
            mask = feats.get("attention_mask")
            used.update((ids[mask.bool()] if mask is not None else ids.reshape(-1)).tolist())

    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            add(batch)
            batch = []
    if batch:
        add(batch)
    return used


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def _special_ids(tokenizer: Any, tj: dict[str, Any]) -> set[int]:
    ids = {t["id"] for t in tj.get("added_tokens", [])}
    ids.update(i for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    return ids


def _bpe_closure(model: dict[str, Any], keep: set[str]) -> tuple[set[str], list[Any]]:
    """Add the merge inputs of every kept token (recursively); return kept tokens and the kept merges."""
    # A token can be produced by several merges ("ab"+"c" and "a"+"bc"); a word may take any of those paths, so
    # the inputs of every producing merge are kept.
    producers: dict[str, list[tuple[str, str]]] = {}
    merges = model.get("merges", [])
    prefix = model.get("continuing_subword_prefix") or ""
    for m in merges:
        producers.setdefault(_merged(m, prefix), []).append(_merge_pair(m))
    stack = list(keep)
    while stack:
        tok = stack.pop()
        for pair in producers.get(tok, ()):
            for part in pair:
                if part not in keep and part in model["vocab"]:
                    keep.add(part)
                    stack.append(part)
    kept_merges = [m for m in merges if all(p in keep for p in _merge_pair(m))
                   and _merged(m, prefix) in keep]
    return keep, kept_merges


def _merged(merge: Any, prefix: str) -> str:
    a, b = _merge_pair(merge)
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def _is_byte_level(tj: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _remap_ids(node: Any, mapping: dict[int, int]) -> Any:
    """Rewrite token ids inside post-processor specs (TemplateProcessing, Bert/Roberta processing, Sequence)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                out[key] = [mapping[i] for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                out[key] = [value[0], mapping[value[1]]]
            else:
                out[key] = _remap_ids(value, mapping)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, mapping) for v in node]
    return node


def pruned_tokenizer_json(tokenizer: Any, used_ids: set[int]) -> tuple[dict[str, Any], list[int]]:
    """A rewritten ``tokenizer.json`` dict keeping ``used_ids`` (plus what the model type needs).

    Returns ``(tokenizer_json, kept_old_ids)``: new id ``i`` is old id ``kept_old_ids[i]``.
    """
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj["model"]
    kind = model["type"]
    keep_ids = set(used_ids) | _special_ids(tokenizer, tj)
    if kind in ("WordPiece", "BPE", "WordLevel"):
        vocab: dict[str, int] = model["vocab"]
        id_to_tok = {i: t for t, i in vocab.items()}
        for t in tj.get("added_tokens", []):
            id_to_tok.setdefault(t["id"], t["content"])
        keep_toks = {id_to_tok[i] for i in keep_ids if i in id_to_tok}
        if model.get("unk_token") and model["unk_token"] in vocab:
            keep_toks.add(model["unk_token"])
        if kind == "BPE":
            if _is_byte_level(tj):
                keep_toks.update(t for t in vocab if len(t) == 1)
            keep_toks, kept_merges = _bpe_closure(model, keep_toks)
        all_ids = set(vocab.values()) | {t["id"] for t in tj.get("added_tokens", [])}
        kept_old = sorted(i for i in all_ids if id_to_tok.get(i) in keep_toks)
        mapping = {old: new for new, old in enumerate(kept_old)}
        model["vocab"] = {t: mapping[i] for t, i in vocab.items() if i in mapping}
        if kind == "BPE":
            model["merges"] = kept_merges
    elif kind == "Unigram":
        pieces = model["vocab"]
        if model.get("unk_id") is not None:
            keep_ids.add(model["unk_id"])
        kept_old = sorted(i for i in range(len(pieces)) if i in keep_ids)
        kept_old = sorted(set(kept_old) | {t["id"] for t in tj.get("added_tokens", [])})
        mapping = {old: new for new, old in enumerate(kept_old)}
        model["vocab"] = [pieces[i] for i in kept_old if i < len(pieces)]
        if model.get("unk_id") is not None:
            model["unk_id"] = mapping[model["unk_id"]]
    else:
        raise TypeError(f"vocabulary pruning does not support {kind} tokenizers")
    tj["added_tokens"] = [{**t, "id": mapping[t["id"]]} for t in tj.get("added_tokens", []) if t["id"] in mapping]
    if tj.get("post_processor"):
        tj["post_processor"] = _remap_ids(tj["post_processor"], mapping)
    return tj, kept_old


def _rebuild_tokenizer(tokenizer: Any, tj: dict[str, Any], mapping: dict[int, int]) -> Any:
    """Save the old tokenizer, swap in the new tokenizer.json (and renumber tokenizer_config ids), reload."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for stale in ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                      "special_tokens_map.json", "added_tokens.json"):
            (Path(tmp) / stale).unlink(missing_ok=True)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        cfg_path = Path(tmp) / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            if isinstance(cfg.get("added_tokens_decoder"), dict):
                cfg["added_tokens_decoder"] = {str(mapping[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()
                                               if int(k) in mapping}
            cfg_path.write_text(json.dumps(cfg, indent=2))
        return AutoTokenizer.from_pretrained(tmp)


def prune_vocabulary(model: Any, texts: Sequence[str], *, extra_ids: Iterable[int] = ()) -> dict[str, Any]:
    """Shrink a SentenceTransformer's vocabulary to what ``texts`` use, in place. Returns a summary.

    The first module must be a sentence-transformers ``Transformer`` with a fast tokenizer. The input embedding
    matrix keeps the rows of the kept tokens; ``config.vocab_size`` and the special token ids in the config
    follow the new numbering.
    """
    import torch
    from torch import nn

    first = model[0]
    tokenizer = first.tokenizer
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise TypeError("vocabulary pruning needs a fast (tokenizers-backed) tokenizer")
    hf = first.auto_model
    used = corpus_token_ids(tokenizer, texts, model=model) | set(extra_ids)
    tj, kept_old = pruned_tokenizer_json(tokenizer, used)
    mapping = {old: new for new, old in enumerate(kept_old)}
    old_emb = hf.get_input_embeddings()
    old_rows = old_emb.weight.shape[0]
    if max(kept_old) >= old_rows:
        raise ValueError(f"tokenizer id {max(kept_old)} has no embedding row (matrix has {old_rows})")
    new_tok = _rebuild_tokenizer(tokenizer, tj, mapping)
    index = torch.tensor(kept_old, dtype=torch.long)
    pad_old = getattr(hf.config, "pad_token_id", None)
    # Slice the rows in place: the embedding module may be a subclass (Gemma scales its output), keep it.
    with torch.no_grad():
        old_emb.weight = nn.Parameter(old_emb.weight[index].clone(), requires_grad=old_emb.weight.requires_grad)
    old_emb.num_embeddings = len(kept_old)
    if getattr(old_emb, "padding_idx", None) is not None:
        old_emb.padding_idx = mapping.get(pad_old) if isinstance(pad_old, int) else None
    hf.config.vocab_size = len(kept_old)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(hf.config, key, None)
        if isinstance(value, int):
            setattr(hf.config, key, mapping.get(value))
        elif isinstance(value, list):
            setattr(hf.config, key, [mapping[v] for v in value if v in mapping])
    first.processor = new_tok
    info = {"vocab_before": int(old_rows), "vocab_after": len(kept_old), "corpus_tokens": len(used),
            "embedding_params_removed": int((old_rows - len(kept_old)) * old_emb.weight.shape[1])}
    logger.info("vocabulary %d -> %d tokens", old_rows, len(kept_old))
    return info


def saved_size(path: str | os.PathLike[str]) -> int:
    """Total bytes of the files under a directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
