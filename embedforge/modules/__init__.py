"""sentence-transformers modules shared by the workflows: pooling heads (latent attention, multi-layer, echo).

Importing this package is cheap; the modules themselves import torch. Directories containing an embedforge module
load with :func:`load_embedder` (installed classes, no ``trust_remote_code``). They also carry the modules' code
(:mod:`embedforge.modules.portable`), so plain ``SentenceTransformer(dir, trust_remote_code=True)`` loads them
without embedforge; sentence-transformers >= 6 imports only its own classes without that flag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

__all__ = ["load_embedder", "module_classes_for"]


def module_classes_for(path: str) -> dict[str, type]:
    """Import the ``embedforge.*`` classes a saved model's ``modules.json`` names (this installed package's own
    code, so no remote code is trusted by doing so)."""
    from embedforge.modules.loading import module_classes_for as _impl

    return _impl(path)


def load_embedder(path: str, **kwargs: Any) -> SentenceTransformer:
    """Load a saved embedder whose modules may include embedforge classes (see :mod:`embedforge.modules.loading`)."""
    from embedforge.modules.loading import load_embedder as _impl

    return _impl(path, **kwargs)
