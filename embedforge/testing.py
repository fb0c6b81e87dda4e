"""Tiny random models and tokenizers for tests and examples; nothing is downloaded.

``tiny_decoder(arch, path)`` writes a 2-layer, hidden-32 causal LM of the given architecture with a small BPE
tokenizer trained on the fly; ``tiny_bert_st(path)`` writes a tiny sentence-transformers BERT model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a man is playing a guitar on the street",
    "a woman is slicing an onion in the kitchen",
    "two dogs are running through a field of grass",
    "the stock market fell sharply on monday morning",
    "scientists discovered a new species of frog in the rainforest",
    "how do i reset my bank card pin",
    "my card payment was declined at the shop",
    "protein folding determines the function of enzymes",
    "the children are playing football in the park",
]


def sample_texts() -> list[str]:
    """A handful of short English sentences for tests."""
    return list(_CORPUS)


def tiny_tokenizer(vocab_size: int = 256, *, bos: bool = True, padding_side: str = "right") -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad/unk/mask tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", padding_side=padding_side, model_max_length=512,
    )
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer, hidden-32 config of ``arch`` (one of :data:`ARCHS`)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    classes = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "gemma2": tf.Gemma2Config,
        "gemma3": tf.Gemma3TextConfig,
        "phi3": tf.Phi3Config,
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(classes)}")
    extra: dict[str, Any] = {}
    if arch in ("qwen3", "gemma2", "gemma3"):
        extra["head_dim"] = 8
    if arch == "phi3":
        common.pop("num_key_value_heads")
        extra["num_key_value_heads"] = 4
    common.update(extra)
    common.update(overrides)
    return classes[arch](**common)


def tiny_decoder(arch: str, path: str | os.PathLike[str], *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random causal LM of ``arch`` plus tokenizer to ``path`` and return it."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_bert_st(path: str | os.PathLike[str], *, seed: int = 0, layers: int = 2, pooling: str = "mean",
                 normalize: bool = True) -> Path:
    """Save a tiny random BERT sentence-transformers model (WordPiece tokenizer) to ``path``."""
    import torch
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6.1 moved the modules
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # pragma: no cover
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # A fixed vocabulary (specials, every corpus word, single characters and their ## forms) rather than a trained
    # one, so two calls give the same tokenizer and therefore the same seeded weights.
    words = sorted({w for line in _CORPUS for w in line.split()})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-"))
    vocab_list = special + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    out = Path(path)
    hf_dir = out.parent / f".{out.name}-hf"
    BertModel(cfg).save_pretrained(hf_dir)
    fast.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=128)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def sigterm_at(step: int) -> Any:
    """A trainer callback that sends this process a real SIGTERM at the end of training step ``step``.

    Tests pass it in ``StageContext.extra["train_callbacks"]`` to interrupt a stage the way a scheduler would.
    """
    import signal

    from transformers import TrainerCallback

    class _SigtermAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return control

    return _SigtermAt()


def run_cli(*args: str) -> Any:
    """``embedforge ARGS`` in-process (click's test runner); returns the click ``Result``."""
    from click.testing import CliRunner

    from embedforge.cli import main

    return CliRunner().invoke(main, list(args))


def error_line(output: str) -> str:
    """The one ``Error: ...`` line of a CLI output, without its prefix (fails when there is not exactly one)."""
    lines = [ln for ln in output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, output
    return lines[0][len("Error: "):]
