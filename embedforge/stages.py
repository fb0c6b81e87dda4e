"""Registry of recipe stages: name -> (config dataclass, runner), as import paths.

Config classes live in torch-free ``<workflow>/config.py`` modules so recipes validate instantly; runners are
imported only when a stage actually runs. A bad registration fails at import of this module's users through
:func:`check_registry` (run by the test suite), not mid-training.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

class StageEntry(NamedTuple):
    """One registered stage: where its config class and runner live, and whether it runs under torchrun."""

    config: str
    """``module:ConfigClass`` (a torch-free module)."""
    runner: str
    """``module:function`` called as ``run(config, out_dir, ctx)``."""
    distributed: bool = False
    """True: under torchrun every rank runs the stage (it trains with one process per device); False: rank 0 runs
    it while the other ranks wait for its output."""


STAGES: dict[str, StageEntry] = {
    "eval": StageEntry("embedforge.evaluation_config:EvalConfig", "embedforge.evaluation:run_stage"),
    # convert/ (owner: convert workflow)
    "convert": StageEntry("embedforge.convert.config:ConvertConfig", "embedforge.convert.pipeline:run_convert"),
    "mntp": StageEntry("embedforge.convert.train_config:MntpConfig", "embedforge.convert.training:run_mntp",
                       distributed=True),
    "simcse": StageEntry("embedforge.convert.train_config:SimcseConfig", "embedforge.convert.training:run_simcse",
                         distributed=True),
    "contrastive": StageEntry("embedforge.convert.train_config:ContrastiveConfig",
                              "embedforge.convert.training:run_contrastive", distributed=True),
    # distill/
    "distill": StageEntry("embedforge.distill.config:DistillConfig", "embedforge.distill.pipeline:run",
                          distributed=True),
    # compress/ (also: embedding quantizer / learned binarizer training)
    "binarizer": StageEntry("embedforge.compress.config:BinarizerConfig", "embedforge.compress.pipeline:run_binarizer",
                            distributed=True),
    "compress": StageEntry("embedforge.compress.config:CompressConfig", "embedforge.compress.pipeline:run",
                           distributed=True),
    # export/
    "export": StageEntry("embedforge.export.config:ExportConfig", "embedforge.export.pipeline:run"),
}


def register(name: str, config_path: str, runner_path: str, *, distributed: bool = False) -> None:
    """Add a stage (used by plug-ins; the built-in ones are listed in ``STAGES``)."""
    entry = StageEntry(config_path, runner_path, distributed)
    if name in STAGES and tuple(STAGES[name]) != tuple(entry):
        raise ValueError(f"stage {name!r} is already registered as {STAGES[name]}")
    STAGES[name] = entry


def is_distributed(name: str) -> bool:
    """Whether every torchrun rank runs stage ``name`` (see :attr:`StageEntry.distributed`); unknown or plain
    ``(config, runner)`` registrations are single-process."""
    entry = STAGES.get(name)
    return bool(entry is not None and len(entry) > 2 and entry[2])


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
