"""Small helpers shared by every stage config (import-light: no torch here).

A stage config is a dataclass whose fields carry a ``help`` string (``opt(...)``) and whose ``__post_init__``
checks values with ``check(...)``. Recipes and the CLI build configs through :func:`embedforge.recipe.build_config`,
which converts YAML values to the annotated types and reports file, line and key on error.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from embedforge.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration value is wrong. ``key`` names the field; the recipe loader adds file and line."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def opt(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a help string (shown by ``embedforge recipes explain``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}", key=key)


def choice(enum_cls: type[enum.Enum], value: Any, key: str) -> Any:
    """Convert a string to a ``str, Enum`` member, listing the valid values on error."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{key}: {value!r} is not one of {valid}", key=key) from None


@dataclass
class StageContext:
    """What a stage runner gets besides its config."""

    recipe_hash: str | None = None
    recipe_path: Path | None = None
    stage_name: str = ""
    force: bool = False
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    extra: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$EMBEDFORGE_CACHE`` or ``~/.cache/embedforge``."""
    import os

    return Path(os.environ.get("EMBEDFORGE_CACHE", Path.home() / ".cache" / "embedforge"))
