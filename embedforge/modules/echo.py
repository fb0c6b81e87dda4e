"""Echo embeddings: the text is written twice inside a template and only the second copy is pooled.

Springer et al., "Repetition Improves Language Model Embeddings" (2024): under causal attention the first copy's
tokens cannot see the rest of the sentence, but the second copy's tokens can attend to the whole first copy, so
their mean carries information about the full text without changing the attention.

Two modules work together:

- :class:`EchoTransformer` (input module, a sentence-transformers ``Transformer``) builds the token ids by
  concatenating separately tokenized pieces: ``[bos] prompt prefix text middle text suffix [eos]``. Both copies
  therefore have exactly the same tokens and length ``L`` (long texts are truncated so both fit).
- :class:`EchoPooling` recovers the second copy's span from the attention mask alone: with ``n`` real tokens,
  ``L = (n - fixed) / 2`` where ``fixed`` counts the template's own tokens, and the span starts after
  ``prefix + L + middle``. No Python control flow depends on the data, so the head exports to ONNX; a serving
  stack must build the same ids (see :meth:`EchoTransformer.preprocess`).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from sentence_transformers.base.modules import Module, Transformer
from torch import Tensor

from embedforge.modules.common import (
    copy_shipped_code, first_token_index, masked_mean, positions_like, prompt_length_of,
)

logger = logging.getLogger(__name__)

DEFAULT_ECHO_TEMPLATE = "Rewrite the sentence: {text}\nRewritten sentence: {text}"
PLACEHOLDER = "{text}"


def split_echo_template(template: str) -> tuple[str, str, str]:
    """Split a template into (prefix, middle, suffix) around its two ``{text}`` placeholders."""
    parts = template.split(PLACEHOLDER)
    if len(parts) != 3:
        raise ValueError(f"echo template must contain {PLACEHOLDER} exactly twice, got {template!r}")
    return parts[0], parts[1], parts[2]


class EchoTransformer(Transformer):
    """A sentence-transformers ``Transformer`` whose text inputs are echoed through a template.

    All ``Transformer`` arguments are accepted; ``echo_template`` (saved in ``sentence_bert_config.json``) must
    contain ``{text}`` twice. Only plain-text inputs are supported.
    """

    config_keys: list[str] = [*Transformer.config_keys, "echo_template"]

    def __init__(self, model_name_or_path: str, *, echo_template: str = DEFAULT_ECHO_TEMPLATE, **kwargs: Any) -> None:
        split_echo_template(echo_template)
        super().__init__(model_name_or_path, **kwargs)
        self.echo_template = echo_template
        self._piece_cache: dict[str, Any] | None = None

    # -- tokenization -------------------------------------------------------------------------------------
    def _pieces(self) -> dict[str, Any]:
        """Token ids of the template pieces and of the tokenizer's own special tokens (computed once)."""
        if self._piece_cache is not None:
            return self._piece_cache
        tok = self.tokenizer
        prefix, middle, suffix = split_echo_template(self.echo_template)
        # Byte-level BPE merges a space with the following word ("Ġword"), so a space that ends a template
        # piece is moved to the front of the text instead of becoming a lone token.
        lead_space = prefix.endswith(" ")
        if lead_space:
            prefix = prefix.rstrip(" ")
            middle = middle.rstrip(" ") if middle.endswith(" ") else middle

        backend = getattr(tok, "backend_tokenizer", None)

        def ids(text: str) -> list[int]:
            if not text:
                return []
            if backend is not None:  # no length warning for long texts: truncation happens in echo_ids
                return list(backend.encode(text, add_special_tokens=False).ids)
            return list(tok(text, add_special_tokens=False)["input_ids"])

        probe_plain = ids("a")
        probe_full = list(tok("a")["input_ids"])
        start = next((i for i in range(len(probe_full)) if probe_full[i:i + len(probe_plain)] == probe_plain), 0)
        self._piece_cache = {
            "bos": probe_full[:start],
            "eos": probe_full[start + len(probe_plain):],
            "prefix": ids(prefix),
            "middle": ids(middle),
            "suffix": ids(suffix),
            "lead_space": lead_space,
            "ids": ids,
        }
        return self._piece_cache

    def echo_spec(self) -> dict[str, Any]:
        """The id pieces a serving stack needs to rebuild :meth:`echo_ids` without this class: ``bos``, ``prefix``,
        ``middle``, ``suffix``, ``eos`` (lists of ids) and ``lead_space`` (tokenize the text as ``" " + text``)."""
        p = self._pieces()
        spec: dict[str, Any] = {k: list(p[k]) for k in ("bos", "prefix", "middle", "suffix", "eos")}
        spec["lead_space"] = bool(p["lead_space"])
        return spec

    def echo_lengths(self) -> dict[str, int]:
        """Token counts the :class:`EchoPooling` head needs (without a prompt)."""
        p = self._pieces()
        return {
            "leading_tokens": len(p["bos"]),
            "prefix_tokens": len(p["prefix"]),
            "middle_tokens": len(p["middle"]),
            "suffix_tokens": len(p["suffix"]) + len(p["eos"]),
        }

    def echo_ids(self, text: str, prompt: str | None = None, max_length: int | None = None) -> list[int]:
        """The token ids of one echoed text (the exact sequence a serving stack must reproduce)."""
        p = self._pieces()
        ids = p["ids"]
        prompt_ids = ids(prompt) if prompt else []
        text_ids = ids((" " if p["lead_space"] else "") + text)
        fixed = len(p["bos"]) + len(prompt_ids) + len(p["prefix"]) + len(p["middle"]) + len(p["suffix"]) + len(p["eos"])
        if max_length is not None:
            if fixed >= max_length:
                raise ValueError(
                    f"the echo template (and prompt) take {fixed} tokens, leaving no room for the text within "
                    f"max_seq_length={max_length}; raise max_seq_length or shorten the template"
                )
            text_ids = text_ids[: (max_length - fixed) // 2]
        return [*p["bos"], *prompt_ids, *p["prefix"], *text_ids, *p["middle"], *text_ids, *p["suffix"], *p["eos"]]

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Tokenize texts into echoed, padded id tensors (``prompt_length`` counts bos + prompt tokens)."""
        if not inputs:
            return {}
        if not all(isinstance(x, str) for x in inputs):
            raise ValueError("echo embeddings support plain text inputs only (no pairs, images or messages)")
        tok = self.tokenizer
        max_length = kwargs.get("max_length") or self.max_seq_length or tok.model_max_length
        rows = [self.echo_ids(text, prompt, max_length) for text in inputs]
        width = max(len(r) for r in rows)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if tok.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "modality": "text"}
        if prompt:
            out["prompt_length"] = len(self._pieces()["bos"]) + len(self._pieces()["ids"](prompt))
        return out


class EchoPooling(Module):
    """Mean of the second copy of the text in an echoed sequence (see module docstring).

    Args:
        embedding_dimension: hidden size of the token embeddings.
        leading_tokens: tokens before the template when there is no prompt (the BOS token, if any). With a prompt,
            the ``prompt_length`` feature (bos + prompt tokens) replaces it.
        prefix_tokens, middle_tokens, suffix_tokens: token counts of the template pieces around the two copies
            (``suffix_tokens`` includes an appended EOS).
    """

    config_keys = ["embedding_dimension", "leading_tokens", "prefix_tokens", "middle_tokens", "suffix_tokens"]

    def __init__(
        self,
        embedding_dimension: int,
        leading_tokens: int,
        prefix_tokens: int,
        middle_tokens: int,
        suffix_tokens: int,
    ) -> None:
        super().__init__()
        self.embedding_dimension = embedding_dimension
        self.leading_tokens = leading_tokens
        self.prefix_tokens = prefix_tokens
        self.middle_tokens = middle_tokens
        self.suffix_tokens = suffix_tokens

    def second_copy_mask(self, attention_mask: Tensor, prompt_length: int | None = None) -> Tensor:
        """``(batch, seq)`` 0/1 mask of the second copy's tokens, for left or right padding."""
        lead = self.leading_tokens if prompt_length is None else prompt_length
        fixed = lead + self.prefix_tokens + self.middle_tokens + self.suffix_tokens
        real = attention_mask.sum(dim=1)
        length = torch.div(real - fixed, 2, rounding_mode="floor").clamp(min=0)
        first = first_token_index(attention_mask).to(real.dtype)
        start = first + lead + self.prefix_tokens + length + self.middle_tokens
        pos = positions_like(attention_mask)
        inside = (pos >= start.unsqueeze(1)) & (pos < (start + length).unsqueeze(1))
        return inside.to(attention_mask.dtype)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        tokens = features["token_embeddings"]
        mask = self.second_copy_mask(features["attention_mask"], prompt_length_of(features))
        features["sentence_embedding"] = masked_mean(tokens, mask)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        copy_shipped_code(self, output_path)
