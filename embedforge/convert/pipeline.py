"""The ``convert`` stage runner: build the zero-shot embedder and save it in the one model format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from embedforge.configs import StageContext
from embedforge.convert.config import ConvertConfig

logger = logging.getLogger(__name__)


def run_convert(config: ConvertConfig, out_dir: Path, ctx: StageContext) -> None:
    """Recipe stage ``convert``.

    1. build the embedder (:func:`embedforge.convert.embedder.build_embedder_from_config`), cut to its first
       ``layers`` decoder layers if asked (:func:`embedforge.backbone.apply_layers`);
    2. optionally score it on ``config.eval_tasks``;
    3. save it with lineage (``stage="convert"``) to ``out_dir``, atomically.
    """
    from embedforge.convert.embedder import build_embedder_from_config
    from embedforge.model import save_model

    model = build_embedder_from_config(config)
    kept = None
    if config.layers is not None:
        from embedforge.backbone import apply_layers

        kept = apply_layers(model, config.layers, source=config.model)
    metrics: dict[str, Any] = {}
    if config.eval_tasks:
        from embedforge.evaluation import evaluate

        metrics = evaluate(model, config.eval_tasks)
    extra = {
        "pooling": config.pooling.value,
        "bidirectional": config.bidirectional,
        "embedding_dimension": model.get_embedding_dimension(),
        "layers": config.layers,
        "kept_layers": kept["kept_layers"] if kept else None,
    }
    save_model(
        model, out_dir, stage="convert", source=config.model, config=config, metrics=metrics,
        recipe_hash=ctx.recipe_hash, extra=extra,
    )
    logger.info("converted %s -> %s", config.model, out_dir)
