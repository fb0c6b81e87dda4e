"""Registry of recipe stages: name -> (config dataclass, runner), as import paths.

Config classes live in torch-free ``<workflow>/config.py`` modules so recipes validate instantly; runners are
imported only when a stage actually runs. A bad registration fails at import of this module's users through
:func:`check_registry` (run by the test suite), not mid-training.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# stage name -> ("module:ConfigClass", "module:runner")
STAGES: dict[str, tuple[str, str]] = {
    "eval": ("embedforge.evaluation_config:EvalConfig", "embedforge.evaluation:run_stage"),
    # convert/ (owner: convert workflow)
    "convert": ("embedforge.convert.config:ConvertConfig", "embedforge.convert.pipeline:run_convert"),
    "mntp": ("embedforge.convert.train_config:MntpConfig", "embedforge.convert.training:run_mntp"),
    "simcse": ("embedforge.convert.train_config:SimcseConfig", "embedforge.convert.training:run_simcse"),
    "contrastive": ("embedforge.convert.train_config:ContrastiveConfig", "embedforge.convert.training:run_contrastive"),
    # distill/
    "distill": ("embedforge.distill.config:DistillConfig", "embedforge.distill.pipeline:run"),
    # compress/ (also: embedding quantizer / learned binarizer training)
    "binarizer": ("embedforge.compress.config:BinarizerConfig", "embedforge.compress.pipeline:run_binarizer"),
    "compress": ("embedforge.compress.config:CompressConfig", "embedforge.compress.pipeline:run"),
    # export/
    "export": ("embedforge.export.config:ExportConfig", "embedforge.export.pipeline:run"),
}


def register(name: str, config_path: str, runner_path: str) -> None:
    """Add a stage (used by plug-ins; the built-in ones are listed in ``STAGES``)."""
    if name in STAGES and STAGES[name] != (config_path, runner_path):
        raise ValueError(f"stage {name!r} is already registered as {STAGES[name]}")
    STAGES[name] = (config_path, runner_path)


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_class(name: str) -> type:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return _import(STAGES[name][0])


def runner(name: str) -> Callable[..., Any]:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return _import(STAGES[name][1])


def check_registry() -> None:
    """Import every config class (cheap) and make sure each has a ``model`` field."""
    import dataclasses

    for name in STAGES:
        cls = config_class(name)
        names = {f.name for f in dataclasses.fields(cls)}
        if "model" not in names:
            raise TypeError(f"stage {name!r}: {cls.__name__} has no 'model' field")
