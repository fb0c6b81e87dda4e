"""The onnxruntime encoder of export directories; it lives in :mod:`embedforge.onnx_encoder` (core), because
evaluation reads export directories too. These names stay importable from here."""

from __future__ import annotations

from embedforge.onnx_encoder import MANIFEST, OnnxEncoder, Tokenize, TokenizerSpec, read_manifest, session_options

__all__ = ["MANIFEST", "OnnxEncoder", "Tokenize", "TokenizerSpec", "read_manifest", "session_options"]
