"""Run exported graphs with onnxruntime: :class:`OnnxEncoder` implements the evaluation ``Encoder`` protocol.

Core, not part of export/: evaluation reads export directories with it, and the export workflow checks its
graphs with it (``embedforge.export.encoder`` re-exports these names).

The encoder needs nothing from PyTorch or transformers: it tokenizes with the export's ``tokenizer.json`` through
the ``tokenizers`` library, exactly as a server would, so evaluating it measures the artifact a server gets.
Texts are tokenized once up front (in Rust, in parallel), sorted by token count so batches carry little padding,
padded into numpy arrays and run batch by batch; while onnxruntime works on one batch (it releases the GIL) a
helper thread builds the next.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class TokenizerSpec:
    """How texts become graph inputs; stored under ``"tokenizer"`` in ``manifest.json``.

    ``echo`` holds the token-id pieces of an echo-embedding template (see :mod:`embedforge.modules.echo`):
    ``bos, prefix, middle, suffix, eos`` id lists and ``lead_space``; a text is then laid out as
    ``bos prefix text middle text suffix eos`` with the text truncated so both copies fit.
    """

    file: str = "tokenizer.json"
    max_length: int = 512
    pad_token_id: int = 0
    padding_side: str = "right"
    lowercase: bool = False
    echo: dict[str, Any] | None = None
    inputs: list[str] = field(default_factory=lambda: ["input_ids", "attention_mask"])

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Tokenize:
    """Turn texts into unpadded token-id lists (and type ids) following a :class:`TokenizerSpec`."""

    def __init__(self, spec: TokenizerSpec, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(folder / spec.file))
        self.tokenizer.no_padding()
        if spec.echo is None:
            self.tokenizer.enable_truncation(spec.max_length)
        else:
            self.tokenizer.no_truncation()

    def __call__(self, texts: Sequence[str], prompt: str | None = None) -> tuple[list[list[int]], list[list[int]]]:
        texts = [(prompt or "") + t for t in texts] if self.spec.echo is None else list(texts)
        if self.spec.lowercase:
            texts = [t.lower() for t in texts]
        if self.spec.echo is not None:
            rows = [self._echo_ids(t, prompt) for t in texts]
            return rows, [[0] * len(r) for r in rows]
        encodings = self.tokenizer.encode_batch(texts)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def _plain_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _echo_ids(self, text: str, prompt: str | None) -> list[int]:
        e = self.spec.echo or {}
        prompt_ids = self._plain_ids(prompt) if prompt else []
        text_ids = self._plain_ids((" " if e.get("lead_space") else "") + text)
        fixed = sum(len(e[k]) for k in ("bos", "prefix", "middle", "suffix", "eos")) + len(prompt_ids)
        text_ids = text_ids[: max(0, (self.spec.max_length - fixed) // 2)]
        return [*e["bos"], *prompt_ids, *e["prefix"], *text_ids, *e["middle"], *text_ids, *e["suffix"], *e["eos"]]

    def pad(self, ids: Sequence[list[int]], type_ids: Sequence[list[int]]) -> dict[str, np.ndarray]:
        """Pad a batch into int64 arrays named like the graph inputs."""
        width = max(1, max(len(r) for r in ids))
        n = len(ids)
        input_ids = np.full((n, width), self.spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, (row, trow) in enumerate(zip(ids, type_ids)):
            span = slice(width - len(row), width) if self.spec.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = row
            mask[i, span] = 1
            types[i, span] = trow
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.spec.inputs}


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of an export directory."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an export directory: {MANIFEST} is missing")
    return json.loads(path.read_text())


def session_options(threads: int | None = None, spin: bool = True) -> Any:
    """onnxruntime session options: all graph optimizations, ``threads`` intra-op threads (None: runtime default).

    ``spin=False`` stops idle worker threads from busy-waiting, which helps when other processes share the cores.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OnnxEncoder:
    """Sentence embeddings from an exported ONNX graph (the ``Encoder`` protocol of :mod:`embedforge.evaluation`).

    Args:
        path: an export directory (with ``manifest.json``) or a directory holding ``tokenizer.json``.
        file: the graph inside ``path`` (default ``onnx/model.onnx``).
        providers: onnxruntime execution providers (default CPU).
        threads: intra-op threads (default: onnxruntime's choice).
        spin: let idle onnxruntime threads busy-wait (fastest on an otherwise idle machine).
        tokenizer: a :class:`TokenizerSpec` overriding the manifest's (used while the manifest is being written).
        prompts: named prompts (``{"query": "...", ...}``); default: the manifest's.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        file: str = "onnx/model.onnx",
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
        tokenizer: TokenizerSpec | None = None,
        prompts: dict[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.folder = Path(path)
        manifest = read_manifest(self.folder) if tokenizer is None else {}
        self.spec = tokenizer or TokenizerSpec.from_json(manifest["tokenizer"])
        self.prompts = prompts if prompts is not None else manifest.get("prompts", {})
        self.prompt_pooling = manifest.get("prompt_pooling", True)
        self.tokenize = Tokenize(self.spec, self.folder)
        self.file = file
        self.session = ort.InferenceSession(
            str(self.folder / file), session_options(threads, spin), providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = set(self.input_names) - set(self.spec.inputs)
        if missing:
            raise ValueError(f"{file} needs inputs {sorted(missing)} that the tokenizer spec does not produce")

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.folder / self.file})"

    def prompt_for(self, role: str) -> str | None:
        """The export's named prompt for ``role`` (``query`` / ``document``), if any."""
        return (self.prompts or {}).get(role) or None

    def _batches(self, ids: list[list[int]], types: list[list[int]], order: np.ndarray,
                 batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(row indices, padded inputs)``; the next batch is padded in a helper thread meanwhile."""
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

        def build(idx: np.ndarray) -> dict[str, np.ndarray]:
            feeds = self.tokenize.pad([ids[i] for i in idx], [types[i] for i in idx])
            return {k: v for k, v in feeds.items() if k in self.input_names}

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(build, chunks[0]) if chunks else None
            for n, idx in enumerate(chunks):
                feeds = pending.result() if pending is not None else {}
                pending = pool.submit(build, chunks[n + 1]) if n + 1 < len(chunks) else None
                yield idx, feeds

    def run(self, texts: Sequence[str], batch_size: int = 32, prompt: str | None = None, *,
            sort_by_length: bool = True) -> dict[str, list[np.ndarray]]:
        """Every graph output for every text, in input order, as one array per text (padding removed for
        token outputs), plus ``"attention_mask"`` rows."""
        if prompt and not self.prompt_pooling:
            raise ValueError("this export pools without knowing prompt lengths; encode without a prompt")
        texts = list(texts)
        ids, types = self.tokenize(texts, prompt)
        order = np.argsort([-len(r) for r in ids], kind="stable") if sort_by_length else np.arange(len(texts))
        results: dict[str, list[Any]] = {name: [None] * len(texts) for name in self.output_names}
        results["attention_mask"] = [None] * len(texts)
        for idx, feeds in self._batches(ids, types, order, batch_size):
            outputs = self.session.run(self.output_names, feeds)
            mask = feeds["attention_mask"].astype(bool)
            for name, value in zip(self.output_names, outputs):
                for row, i in enumerate(idx):
                    results[name][i] = value[row][mask[row]] if value.ndim == 3 else value[row]
            for row, i in enumerate(idx):
                results["attention_mask"][i] = mask[row]
        return results

    def encode(self, texts: list[str], batch_size: int = 32, prompt: str | None = None) -> np.ndarray:
        """``(len(texts), dim)`` float32 sentence embeddings (as the graph computes them: normalized if it does)."""
        if "sentence_embedding" not in self.output_names:
            raise ValueError(f"{self.file} has no sentence_embedding output (outputs: {self.output_names})")
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        emb = self.run(texts, batch_size, prompt)["sentence_embedding"]
        return np.stack(emb).astype(np.float32, copy=False)

    def encode_binary(self, texts: list[str], batch_size: int = 32, prompt: str | None = None) -> np.ndarray:
        """Packed uint8 codes (numpy ``packbits`` layout) from a graph with a ``binary_embedding`` output."""
        if "binary_embedding" not in self.output_names:
            raise ValueError(f"{self.file} has no binary_embedding output (outputs: {self.output_names})")
        return np.stack(self.run(texts, batch_size, prompt)["binary_embedding"]).astype(np.uint8, copy=False)
