"""Parity of an exported graph with the PyTorch model it came from.

The reference is computed by sentence-transformers itself — its own tokenization, one text at a time (so no
padding at all) — and then truncated / normalized the way the graph is configured to. The graph is run through
:class:`~embedforge.export.encoder.OnnxEncoder` in mixed-length batches in input order, so padding, the tokenizer
file, truncation of long inputs and every in-graph step are all covered by one comparison.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from embedforge.evaluation import l2_normalize
from embedforge.errors import RunError

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

    from embedforge.export.encoder import OnnxEncoder

logger = logging.getLogger(__name__)

_PROBES = [
    "a",
    "The cat sat on the mat.",
    "How do I reset the PIN of my bank card?",
    "Protein folding determines the function of enzymes, and misfolding is linked to several diseases.",
    "Two dogs are running through a field of tall grass while a man throws a red ball.",
    "naïve café – déjà vu; emoji 🙂 and symbols #42 @home 3.14",
    "What is the capital of France?",
    "The stock market fell sharply on Monday morning after the central bank raised interest rates again.",
    "short",
    "  leading and trailing spaces  ",
    "UPPER CASE AND lower case Mixed",
    "A woman is slicing an onion in the kitchen.",
]


class ParityError(RunError, RuntimeError):
    """An exported graph's outputs differ from the PyTorch model's beyond the configured tolerance."""


@dataclass
class Parity:
    """How close one graph's outputs are to the reference (recorded in ``manifest.json``)."""

    probes: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    worst_probe: int
    bit_agreement: float | None = None  # for packed binary outputs: share of equal bits
    passed: bool = True
    tolerance: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def probe_texts(long_tokens: int = 512, extra: Sequence[str] = ()) -> list[str]:
    """Short, medium, unicode and one long text (about ``long_tokens`` word pieces), plus ``extra``."""
    base = " ".join(_PROBES[1:5])
    words = base.split()
    long_text = " ".join(words[i % len(words)] for i in range(long_tokens))
    return [*_PROBES, long_text, *extra]


def reference_embeddings(model: SentenceTransformer, texts: Sequence[str], *, truncate_dim: int | None,
                         normalize: bool) -> np.ndarray:
    """sentence-transformers embeddings of ``texts`` computed one by one, post-processed like the graph."""
    import torch

    with torch.inference_mode():
        rows = [
            np.asarray(model.encode([t], batch_size=1, convert_to_numpy=True, show_progress_bar=False,
                                    normalize_embeddings=False, truncate_dim=None))[0]
            for t in texts
        ]
    emb = np.stack(rows)
    # packed codes (a binarizer with output "packed") stay uint8: the graph neither truncates nor normalizes them
    emb = emb.astype(np.uint8) if emb.dtype == np.uint8 else emb.astype(np.float32)
    if np.issubdtype(emb.dtype, np.floating):
        if truncate_dim is not None:
            emb = emb[:, :truncate_dim]
        if normalize:
            emb = l2_normalize(emb)
    return emb


def reference_binary(model: SentenceTransformer, texts: Sequence[str]) -> np.ndarray | None:
    """The packed codes (``binary_embedding``) the model's own binarizer module writes, one text at a time.

    ``None`` when no module of the model writes them. A learned binarizer with ``bits`` levels gives
    ``bits * dim / 8`` bytes per text, so its codes are not the sign bits of the sentence embedding.
    """
    import torch

    from embedforge.modules.binarizer import find_binarizer

    if find_binarizer(model) is None:
        return None
    rows = []
    with torch.inference_mode():
        for t in texts:
            features = model.encode([t], batch_size=1, output_value=None, show_progress_bar=False)[0]
            code = features["binary_embedding"]
            rows.append(np.asarray(code.cpu().numpy() if hasattr(code, "cpu") else code, dtype=np.uint8))
    return np.stack(rows)


def reference_tokens(model: SentenceTransformer, texts: Sequence[str]) -> list[np.ndarray]:
    """sentence-transformers token vectors (padding removed) of ``texts``, one text at a time."""
    import torch

    out = []
    with torch.inference_mode():
        for t in texts:
            value = model.encode([t], batch_size=1, output_value="token_embeddings", show_progress_bar=False)[0]
            out.append(np.asarray(value.float().cpu().numpy() if hasattr(value, "cpu") else value, dtype=np.float32))
    return out


def compare(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> Parity:
    """Max absolute difference and per-probe cosine between two lists of arrays (any shape per probe)."""
    max_abs, cosines = 0.0, []
    for ref, got in zip(reference, actual):
        ref = np.asarray(ref, dtype=np.float64).reshape(-1)
        got = np.asarray(got, dtype=np.float64).reshape(-1)
        if ref.shape != got.shape:
            raise ParityError(f"output shape {got.shape} differs from the reference shape {ref.shape}")
        max_abs = max(max_abs, float(np.abs(ref - got).max(initial=0.0)))
        denom = np.linalg.norm(ref) * np.linalg.norm(got)
        cosines.append(float(ref @ got / denom) if denom > 0 else float(np.allclose(ref, got)))
    cos = np.asarray(cosines)
    return Parity(probes=len(cos), max_abs_diff=max_abs, min_cosine=float(cos.min()),
                  mean_cosine=float(cos.mean()), worst_probe=int(cos.argmin()))


def bit_agreement(reference: np.ndarray, packed: np.ndarray) -> float:
    """Share of bits of ``packed`` equal to the reference codes.

    ``reference`` is either packed uint8 codes (what the model's binarizer wrote) or float vectors, whose sign bits
    (``np.packbits(reference > 0)``) are then the reference. Codes of different widths raise :class:`ParityError`.
    """
    ref = np.asarray(reference)
    ref_packed = ref.astype(np.uint8) if ref.dtype == np.uint8 else np.packbits(ref > 0, axis=-1)
    got_packed = np.asarray(packed, dtype=np.uint8)
    if ref_packed.shape != got_packed.shape:
        raise ParityError(f"binary output has {got_packed.shape[-1]} bytes per vector, the PyTorch model "
                          f"{ref_packed.shape[-1]}")
    return float((np.unpackbits(ref_packed, axis=-1) == np.unpackbits(got_packed, axis=-1)).mean())


def check_sentence_graph(
    encoder: OnnxEncoder,
    reference: np.ndarray,
    texts: Sequence[str],
    *,
    min_cosine: float,
    max_abs: float | None = None,
    min_bit_agreement: float = 0.99,
    reference_codes: np.ndarray | None = None,
) -> Parity:
    """Compare a sentence-embedding graph with ``reference``; raise :class:`ParityError` past the tolerance.

    ``max_abs`` is scaled by the largest reference magnitude (at least 1). The graph runs in batches of 5 so
    that short and long probes share padded batches. A ``binary_embedding`` output is compared with
    ``reference_codes`` (the model's own binarizer, see :func:`reference_binary`) or else with the sign bits of
    a float ``reference``.
    """
    outputs = encoder.run(list(texts), batch_size=5, sort_by_length=False)
    parity = compare(list(reference), outputs["sentence_embedding"])
    if "binary_embedding" in outputs:
        if reference_codes is not None:
            parity.bit_agreement = bit_agreement(reference_codes, np.stack(outputs["binary_embedding"]))
        elif np.issubdtype(reference.dtype, np.floating):
            parity.bit_agreement = bit_agreement(reference, np.stack(outputs["binary_embedding"]))
    scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
    problems = _tolerance_problems(parity, scale, min_cosine, max_abs)
    if parity.bit_agreement is not None and parity.bit_agreement < min_bit_agreement:
        problems.append(f"binary output agrees on only {parity.bit_agreement:.4f} of bits")
    _finish(encoder, parity, problems, texts)
    return parity


def check_token_graph(encoder: OnnxEncoder, reference: Sequence[np.ndarray], texts: Sequence[str], *,
                      min_cosine: float, max_abs: float | None = None) -> Parity:
    """Compare a ``last_hidden_state`` graph with per-text reference token vectors (padding removed)."""
    outputs = encoder.run(list(texts), batch_size=5, sort_by_length=False)
    parity = compare(reference, outputs["last_hidden_state"])
    scale = max(1.0, max(float(np.abs(r).max(initial=0.0)) for r in reference))
    problems = _tolerance_problems(parity, scale, min_cosine, max_abs)
    _finish(encoder, parity, problems, texts)
    return parity


def _tolerance_problems(parity: Parity, scale: float, min_cosine: float, max_abs: float | None) -> list[str]:
    """Record the tolerances on ``parity`` and list every one it exceeds (``max_abs`` scaled by ``scale``)."""
    parity.tolerance = {"min_cosine": min_cosine}
    problems = []
    if parity.min_cosine < min_cosine:
        problems.append(f"min cosine {parity.min_cosine:.6f} < {min_cosine}")
    if max_abs is not None:
        parity.tolerance["max_abs_diff"] = max_abs * scale
        if parity.max_abs_diff > max_abs * scale:
            problems.append(f"max abs diff {parity.max_abs_diff:.3g} > {max_abs * scale:.3g}")
    return problems


def _finish(encoder: OnnxEncoder, parity: Parity, problems: list[str], texts: Sequence[str]) -> None:
    parity.passed = not problems
    if problems:
        worst = texts[parity.worst_probe]
        shown = worst if len(worst) < 60 else worst[:57] + "..."
        raise ParityError(
            f"{encoder.file} does not match the PyTorch model: {'; '.join(problems)} "
            f"(worst probe #{parity.worst_probe}: {shown!r}). Re-export with another exporter or "
            f"attn_implementation, or loosen the tolerance in the export config if this precision is expected."
        )
    logger.info("%s parity: min cosine %.6f, max abs diff %.3g over %d probes", encoder.file,
                parity.min_cosine, parity.max_abs_diff, parity.probes)
