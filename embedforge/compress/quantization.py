"""Embedding quantization for the compress workflow: the code lives in the core module
:mod:`embedforge.quantization` (numpy only), which evaluation also uses for binary search with int8 rescoring."""

from __future__ import annotations

from embedforge.quantization import (  # noqa: F401 (re-exported names)
    PRECISIONS,
    QUANTIZATION_FILE,
    BinaryRescoreIndex,
    EmbeddingQuantizer,
    Int8Calibration,
    binary_search,
    faiss_binary_index,
    hamming_distances,
    pack_binary,
    rescore,
    st_binary,
    truncate,
    unpack_binary,
)
