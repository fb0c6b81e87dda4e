"""Prompts and pooling: refuse an instruction prompt that sentence-transformers would cut one token too far.

sentence-transformers leaves as many leading tokens out of pooling as the prompt has on its own. Shared by the
stages that build or load models (convert, distill's teacher, evaluation, :mod:`embedforge.modules.loading`), so it
lives beside the modules rather than in one workflow.
"""

from __future__ import annotations

from typing import Any


def prompt_merges_with_text(tokenizer: Any, prompt: str) -> bool:
    """True when the prompt's last token changes once text follows it (e.g. a trailing space that byte-level BPE
    merges into the next word: ``"query: "`` -> ``[query, :, Ġ]`` alone but ``[query, :, ĠA, ...]`` in context).

    sentence-transformers excludes as many leading tokens as the prompt has on its own, so such a prompt would also
    drop the text's first token from pooling.
    """
    alone = list(tokenizer(prompt)["input_ids"])
    if alone and tokenizer.eos_token_id is not None and alone[-1] == tokenizer.eos_token_id:
        alone = alone[:-1]  # an appended EOS is not part of the prompt (sentence-transformers drops it too)
    for word in ("A man", "what", "the"):
        if list(tokenizer(prompt + word)["input_ids"])[: len(alone)] != alone:
            return True
    return False


def weighted_mean_handles_left_padding() -> bool:
    """True when the installed sentence-transformers starts the weighted mean's position weights at the first real
    token (6.1 and later); 6.0 weighs by absolute position, so left padding shifts every weight."""
    import importlib.metadata

    from packaging.version import Version

    return Version(importlib.metadata.version("sentence-transformers")) >= Version("6.1")


def check_prompt_tokens(tokenizer: Any, prompt: str, key: str) -> None:
    """Refuse a prompt that merges with the text after it (see :func:`prompt_merges_with_text`).

    sentence-transformers leaves as many leading tokens out of pooling as the prompt has on its own; when the
    prompt's last token merges with the text (a trailing space in byte-level BPE or SentencePiece), that count is
    one too many, the text's first token is dropped, and a one-word query pools nothing (a zero vector). Raises
    :class:`~embedforge.configs.ConfigError` naming ``key``.
    """
    from embedforge.configs import ConfigError

    if prompt and prompt_merges_with_text(tokenizer, prompt):
        raise ConfigError(
            f"{key}: {prompt!r} ends in a token that the tokenizer merges with the text's first word, so leaving "
            "the prompt out of pooling would drop that word too (a one-word query would pool nothing); end it with "
            f"a newline instead, e.g. {prompt.rstrip() + chr(10)!r}", key=key)


def pools_without_prompt(model: Any) -> bool:
    """True when a module of ``model`` leaves the prompt's tokens out by the count sentence-transformers computes
    (echo pooling counts its own prompt tokens, so it is never affected)."""
    modules = list(model)
    if any(type(m).__name__ == "EchoPooling" or hasattr(m, "echo_ids") for m in modules):
        return False
    return any(getattr(m, "include_prompt", True) is False for m in modules)


def check_model_prompts(model: Any, prompts: dict[str, str], key: str = "") -> None:
    """Refuse (``ConfigError``) any of ``prompts`` that merges with the text when ``model`` pools without it; the
    error names ``key.name`` (or just the name without ``key``)."""
    if not any(prompts.values()):
        return
    tokenizer = getattr(model[0], "tokenizer", None) if len(model) else None
    if tokenizer is None or not pools_without_prompt(model):
        return
    for name, prompt in prompts.items():
        check_prompt_tokens(tokenizer, prompt, f"{key}.{name}" if key else name)
