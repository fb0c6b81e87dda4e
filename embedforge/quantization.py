"""Embedding quantization: Matryoshka truncation, packed binary codes, calibrated int8, and search helpers.

Layouts (so that artifacts drop straight into vector stores):

* ``ubinary``: ``np.packbits(x > 0, axis=-1)`` rows of ``ceil(D / 8)`` uint8, byte for byte what
  sentence-transformers' ``quantize_embeddings(precision="ubinary")`` returns and what FAISS ``IndexBinaryFlat`` /
  ``IndexBinaryHNSW`` store. First dimension -> most significant bit of byte 0. Vespa's ``tensor<int8>(x[D/8])``
  hamming field takes these bytes viewed as int8 (``pack_binary(x, signed=True)``).
* ``binary``: what sentence-transformers means by it -- the packed bytes minus 128, as int8 (the top bit of every
  byte flipped). Hamming distances between two ``binary`` rows equal those between the ``ubinary`` rows, but the
  bytes differ, so never mix the two layouts in one index.
* Qdrant has no hamming distance for user-supplied bits: store the float vectors and let it binarize them
  (binary quantization with rescoring, see an export's ``SERVING.md``).
* ``int8`` / ``uint8``: per-dimension affine buckets from calibration ranges (minimum, maximum per dimension),
  computed by :func:`sentence_transformers.util.quantization.quantize_embeddings`. The ranges are an artifact
  (:class:`Int8Calibration`, JSON) so documents and queries encoded later use the very same buckets.

Everything here is numpy (+ faiss where named) and cheap to import.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
QUANTIZATION_FILE = "embedding_quantization.json"


def truncate(embeddings: np.ndarray, dim: int | None, *, renormalize: bool = True) -> np.ndarray:
    """Keep the first ``dim`` dimensions (Matryoshka truncation), L2-renormalizing rows if asked.

    A ``dim`` larger than the vectors raises ``ValueError``: the stored codes would not have the recorded width.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if dim is not None and dim > x.shape[-1]:
        raise ValueError(f"truncate_dim {dim} is larger than the vectors' {x.shape[-1]} dimensions")
    if dim is None or dim == x.shape[-1]:
        return x
    if dim <= 0:
        raise ValueError(f"truncate dim must be positive, got {dim}")
    x = x[..., :dim]
    if renormalize:
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def pack_binary(embeddings: np.ndarray, *, signed: bool = False) -> np.ndarray:
    """Sign-binarize (``x > 0`` -> bit 1) and pack 8 dimensions per byte, numpy ``packbits`` order.

    ``signed=False`` returns uint8 rows (``ubinary``: FAISS), ``signed=True`` the same bytes viewed as int8 (Vespa's
    hamming layout; not the ``binary`` precision, see :func:`st_binary`).
    """
    bits = np.asarray(embeddings) > 0
    packed = np.packbits(bits, axis=-1)
    return packed.view(np.int8) if signed else packed


def st_binary(embeddings: np.ndarray) -> np.ndarray:
    """The ``binary`` precision: sentence-transformers' layout, packed sign bits minus 128 as int8."""
    return (pack_binary(embeddings).astype(np.int16) - 128).astype(np.int8)


def unpack_binary(codes: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_binary`: uint8 {0, 1} bits, trimmed to ``dim`` columns if given."""
    raw = np.ascontiguousarray(codes).view(np.uint8)
    bits = np.unpackbits(raw, axis=-1)
    return bits[..., :dim] if dim is not None else bits


def hamming_distances(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """All-pairs hamming distance between packed code rows (``(Q, B)`` x ``(N, B)`` -> ``(Q, N)`` int32)."""
    q = np.ascontiguousarray(queries).view(np.uint8)
    d = np.ascontiguousarray(docs).view(np.uint8)
    out = np.empty((q.shape[0], d.shape[0]), dtype=np.int32)
    for i in range(q.shape[0]):
        out[i] = _popcount(np.bitwise_xor(d, q[i])).sum(axis=1, dtype=np.int32)
    return out


_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint8 element (numpy >= 2 has a ufunc; older numpy uses a lookup table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT_TABLE[x]


@dataclass
class Int8Calibration:
    """Per-dimension ranges (``ranges[0]`` minimum, ``ranges[1]`` maximum) for int8 / uint8 buckets."""

    ranges: np.ndarray
    precision: str = "int8"
    truncate_dim: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ranges = np.asarray(self.ranges, dtype=np.float32)
        if self.ranges.ndim != 2 or self.ranges.shape[0] != 2:
            raise ValueError(f"ranges must have shape (2, dim), got {self.ranges.shape}")
        if self.precision not in ("int8", "uint8"):
            raise ValueError(f"calibration precision must be int8 or uint8, got {self.precision!r}")

    @property
    def dim(self) -> int:
        return int(self.ranges.shape[1])

    @classmethod
    def fit(cls, embeddings: np.ndarray, *, precision: str = "int8", truncate_dim: int | None = None,
            percentile: float | None = None) -> Int8Calibration:
        """Compute ranges from calibration vectors: min/max, or the ``percentile`` / ``100 - percentile`` tails."""
        x = truncate(embeddings, truncate_dim)
        if x.shape[0] < 2:
            raise ValueError("int8 calibration needs at least 2 vectors")
        if percentile is None:
            lo, hi = x.min(axis=0), x.max(axis=0)
        else:
            lo, hi = np.percentile(x, percentile, axis=0), np.percentile(x, 100.0 - percentile, axis=0)
        return cls(np.stack([lo, hi]), precision=precision, truncate_dim=truncate_dim,
                   meta={"n_vectors": int(x.shape[0]), "percentile": percentile})

    @property
    def steps(self) -> np.ndarray:
        step = (self.ranges[1] - self.ranges[0]) / 255.0
        return np.where(step == 0, 1.0, step).astype(np.float32)

    def quantize(self, embeddings: np.ndarray) -> np.ndarray:
        """Bucket float vectors with these ranges (sentence-transformers' formula, so both agree)."""
        from sentence_transformers.util.quantization import quantize_embeddings

        x = truncate(embeddings, self.truncate_dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"embeddings have {x.shape[-1]} dims, calibration has {self.dim}")
        return quantize_embeddings(x, precision=self.precision, ranges=self.ranges)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Map codes back to the centres of their buckets (float32)."""
        c = np.asarray(codes).astype(np.float32)
        if self.precision == "int8":
            c = c + 128.0
        return self.ranges[0] + (c + 0.5) * self.steps

    def scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Float query · dequantized document, computed as one matmul on the raw codes plus a per-query offset."""
        q = truncate(queries, self.truncate_dim)
        offset = 128.5 if self.precision == "int8" else 0.5
        scaled = q * self.steps
        const = q @ self.ranges[0] + offset * scaled.sum(axis=1)
        return scaled @ np.asarray(codes, dtype=np.float32).T + const[:, None]

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "truncate_dim": self.truncate_dim, "dim": self.dim,
                "min": self.ranges[0].tolist(), "max": self.ranges[1].tolist(), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Int8Calibration:
        return cls(np.array([data["min"], data["max"]], dtype=np.float32), precision=data.get("precision", "int8"),
                   truncate_dim=data.get("truncate_dim"), meta=data.get("meta", {}))


@dataclass
class EmbeddingQuantizer:
    """One saved recipe for turning float vectors into stored codes: truncate, then quantize.

    ``save(dir)`` writes ``embedding_quantization.json`` (with int8 ranges inline) next to a model; ``load(dir)``
    reads it back so that queries and documents are always quantized identically.
    """

    precision: str = "ubinary"
    truncate_dim: int | None = None
    calibration: Int8Calibration | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.precision in ("int8", "uint8") and self.calibration is None:
            raise ValueError(f"{self.precision} quantization needs calibration ranges (Int8Calibration.fit)")

    @classmethod
    def calibrate(cls, precision: str, embeddings: np.ndarray | None = None, *, truncate_dim: int | None = None,
                  percentile: float | None = None) -> EmbeddingQuantizer:
        """Build a quantizer, fitting int8 ranges on ``embeddings`` when the precision needs them."""
        calib = None
        if precision in ("int8", "uint8"):
            if embeddings is None:
                raise ValueError(f"{precision} quantization needs calibration embeddings")
            calib = Int8Calibration.fit(embeddings, precision=precision, truncate_dim=truncate_dim,
                                        percentile=percentile)
        return cls(precision=precision, truncate_dim=truncate_dim, calibration=calib)

    @property
    def code_width(self) -> int | None:
        """Bytes per stored vector, when the input width is known."""
        if self.truncate_dim is None and self.calibration is None:
            return None
        dim = self.calibration.dim if self.calibration is not None else self.truncate_dim
        assert dim is not None
        return {"float32": 4 * dim, "int8": dim, "uint8": dim}.get(self.precision, (dim + 7) // 8)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = truncate(embeddings, self.truncate_dim)
        if self.precision == "float32":
            return x
        if self.precision == "ubinary":
            return pack_binary(x)
        if self.precision == "binary":
            return st_binary(x)
        assert self.calibration is not None
        return self.calibration.quantize(x)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "truncate_dim": self.truncate_dim,
                "calibration": self.calibration.to_dict() if self.calibration is not None else None}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / QUANTIZATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike[str]) -> EmbeddingQuantizer:
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / QUANTIZATION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no embedding quantizer at {path}")
        data = json.loads(path.read_text())
        calib = Int8Calibration.from_dict(data["calibration"]) if data.get("calibration") else None
        return cls(precision=data["precision"], truncate_dim=data.get("truncate_dim"), calibration=calib)


# --------------------------------------------------------------------------------------------------------- search

def faiss_binary_index(codes: np.ndarray, *, hnsw_m: int | None = None) -> Any:
    """A FAISS ``IndexBinaryFlat`` (or ``IndexBinaryHNSW`` with ``hnsw_m`` links) over packed code rows."""
    import faiss

    raw = np.ascontiguousarray(np.asarray(codes).view(np.uint8))
    nbits = raw.shape[1] * 8
    index = faiss.IndexBinaryHNSW(nbits, hnsw_m) if hnsw_m else faiss.IndexBinaryFlat(nbits)
    index.add(raw)
    return index


def binary_search(index: Any, query_codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by hamming distance: returns (distances, ids), FAISS conventions."""
    raw = np.ascontiguousarray(np.asarray(query_codes).view(np.uint8))
    return index.search(raw, k)


def rescore(queries: np.ndarray, candidates: np.ndarray, doc_vectors: np.ndarray, k: int,
            calibration: Int8Calibration | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidate ids by float query · document (float rows, or int8 codes + calibration).

    Returns (scores, ids) of the best ``k`` per query, best first; candidate ids of -1 (FAISS padding) rank last
    with score -inf and id -1.
    """
    q = np.asarray(queries, dtype=np.float32)
    cand = np.asarray(candidates, dtype=np.int64)
    if q.shape[0] == 1 and cand[0, -1] >= 0:
        return _rescore_one(q[0], cand[0], doc_vectors, k, calibration)
    valid = cand >= 0
    gathered = np.asarray(doc_vectors)[np.where(valid, cand, 0)].astype(np.float32)  # (nq, kc, D)
    if calibration is not None:
        q = truncate(q, calibration.truncate_dim)
        offset = 128.5 if calibration.precision == "int8" else 0.5
        scaled = q * calibration.steps
        const = q @ calibration.ranges[0] + offset * scaled.sum(axis=1)
        s = np.einsum("qkd,qd->qk", gathered, scaled) + const[:, None]
    else:
        s = np.einsum("qkd,qd->qk", gathered, q)
    s = np.where(valid, s, -np.inf).astype(np.float32)
    k = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(s, top, axis=1)
    ids = np.where(np.isfinite(scores), np.take_along_axis(cand, top, axis=1), -1)
    return scores, ids


def _rescore_one(q: np.ndarray, cand: np.ndarray, doc_vectors: np.ndarray, k: int,
                 calibration: Int8Calibration | None) -> tuple[np.ndarray, np.ndarray]:
    """The single-query path of :func:`rescore` (serving latency): a handful of numpy calls, no padding handling."""
    gathered = doc_vectors[cand]
    if calibration is not None:
        if calibration.truncate_dim is not None:
            q = truncate(q[None], calibration.truncate_dim)[0]
        offset = 128.5 if calibration.precision == "int8" else 0.5
        scaled = q * calibration.steps
        s = gathered @ scaled + (q @ calibration.ranges[0] + offset * scaled.sum())
    else:
        s = gathered @ q
    s = s.astype(np.float32, copy=False)
    top = np.argsort(-s, kind="stable")[:k]
    return s[top][None], cand[top][None]


class BinaryRescoreIndex:
    """Two-stage search over one corpus: hamming top-``depth`` on packed sign bits, then int8 rescoring.

    Stage 1 is a FAISS ``IndexBinaryFlat`` over ``pack_binary`` rows (the only thing that must stay in memory:
    ``D / 8`` bytes per document). Stage 2 gathers the candidates' int8 rows — from an in-memory array or a
    ``np.load(..., mmap_mode="r")`` file — and scores them against the float query with the calibration's affine
    map, all queries of a call at once (a few vectorized numpy calls, no Python loop over queries).
    """

    def __init__(self, codes: np.ndarray, doc_codes_int8: np.ndarray, calibration: Int8Calibration) -> None:
        if len(codes) != len(doc_codes_int8):
            raise ValueError(f"{len(codes)} binary rows but {len(doc_codes_int8)} int8 rows")
        self.index = faiss_binary_index(codes)
        self.docs = doc_codes_int8
        self.calibration = calibration
        self._steps = calibration.steps
        self._low = np.ascontiguousarray(calibration.ranges[0], dtype=np.float32)
        self._offset = np.float32(128.5 if calibration.precision == "int8" else 0.5)

    @classmethod
    def build(cls, embeddings: np.ndarray, calibration: Int8Calibration) -> BinaryRescoreIndex:
        """Index float document vectors: sign bits for stage 1, calibrated int8 rows for stage 2."""
        return cls(pack_binary(embeddings), calibration.quantize(embeddings), calibration)

    @property
    def binary_bytes(self) -> int:
        return int(self.index.ntotal * self.index.code_size)

    def search(self, queries: np.ndarray, k: int = 10, depth: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the best ``k`` per query, best first; ids -1 / scores -inf where fewer exist."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        _, cand = self.index.search(np.packbits(q > 0, axis=1), depth)  # the packed query, same layout as docs
        if self.calibration.truncate_dim is not None:
            q = truncate(q, self.calibration.truncate_dim)
        if q.shape[0] == 1 and cand[0, -1] >= 0:  # serving latency: one query, a few 1-D / 2-D numpy calls
            c, qs = cand[0], q[0] * self._steps
            s1 = self.docs[c].astype(np.float32) @ qs + (q[0] @ self._low + self._offset * qs.sum())
            top1 = np.argsort(-s1, kind="stable")[:k]
            return s1[top1][None], c[top1][None]
        scaled = q * self._steps
        const = q @ self._low + self._offset * scaled.sum(axis=1)
        gathered = np.asarray(self.docs[np.maximum(cand, 0)], dtype=np.float32)  # (nq, depth, D)
        s = np.matmul(gathered, scaled[:, :, None])[:, :, 0] + const[:, None]
        missing = cand < 0
        if missing.any():
            s[missing] = -np.inf
        k = min(k, s.shape[1])
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(s, top, axis=1)
        ids = np.where(np.isfinite(scores), np.take_along_axis(cand, top, axis=1), -1)
        return scores, ids
