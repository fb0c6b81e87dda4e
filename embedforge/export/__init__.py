"""embedforge.export: ONNX graphs of whole embedders, checked against PyTorch, laid out for servers.

Entry points (import them from their modules; this package imports nothing heavy):

- :class:`embedforge.export.config.ExportConfig` and :func:`embedforge.export.pipeline.export_model` /
  :func:`~embedforge.export.pipeline.run` (the ``export`` stage; ``embedforge export MODEL --out DIR``);
- :class:`embedforge.export.encoder.OnnxEncoder`: evaluate or serve an export directory with onnxruntime;
- :mod:`embedforge.export.graph` (tracing), :mod:`~embedforge.export.parity`, :mod:`~embedforge.export.precision`
  (fusion, fp16, int8), :mod:`~embedforge.export.layouts` (tokenizer files and per-consumer settings) and
  :mod:`~embedforge.export.serving` (SERVING.md with runnable snippets).
"""
