"""convert: any decoder LLM becomes an embedding model.

- :mod:`embedforge.convert.config` — ``ConvertConfig`` of the ``convert`` stage (torch-free);
- :mod:`embedforge.convert.bidirectional` — bidirectional attention through ``config.is_causal = False``;
- :mod:`embedforge.convert.embedder` — ``build_embedder``: backbone + pooling head as a ``SentenceTransformer``;
- :mod:`embedforge.convert.pipeline` — ``run_convert``, the stage runner;
- the training stages (MNTP, SimCSE, contrastive) build on these in ``train_config`` / ``training``.

Nothing heavy is imported here, so ``import embedforge.convert`` stays instant.
"""
