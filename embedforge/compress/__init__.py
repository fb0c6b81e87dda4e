"""embedforge.compress: make a model and its stored vectors smaller.

* :mod:`~embedforge.compress.quantization` — Matryoshka truncation, packed binary (FAISS / Vespa layouts),
  calibrated int8 with a saved ranges artifact, FAISS binary search and rescoring (numpy only at import).
* :mod:`~embedforge.compress.binarizer` — training and bit-op scoring of the learned multi-bit binarizer
  (the module itself is :class:`embedforge.modules.binarizer.LearnedBinarizer`).
* :mod:`~embedforge.compress.pruning` — layer pruning and healing distillation.
* :mod:`~embedforge.compress.vocab` — vocabulary pruning to a corpus.
* :mod:`~embedforge.compress.weights` — bitsandbytes (GPU) and optimum-quanto weight quantization.
* :mod:`~embedforge.compress.config` / :mod:`~embedforge.compress.pipeline` — the ``compress`` and ``binarizer``
  recipe stages.

Importing this package imports nothing heavy.
"""
