"""The one home of transformer layer lists: which layers a config selects, and cutting a model down to them.

Every stage that keeps a subset of a backbone's layers (convert, the training stages, distill's layer students,
compress's pruning) writes the selection with the one ``layers`` key and calls :func:`select_layers` then
:func:`keep_layers`. The selection vocabulary:

- ``layers: 8`` keeps the first 8 layers;
- ``layers: [0, 3, -1]`` keeps those 0-based layers (negative indices count from the end);
- ``layers: {every: 2}`` keeps every 2nd layer, ending each step on the kept one (1, 3, 5, ...);
- ``layers: {spread: 4}`` keeps 4 layers evenly spread over the depth, always the first and the last.

:func:`keep_layers` does the surgery for Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) and BERT
encoders: the layer list, ``config.num_hidden_layers``, per-layer config lists (``layer_types``), each attention
block's ``layer_idx`` and the hidden-state indices of pooling heads that read several layers.

This module imports no torch at import time; recipes validate with :func:`check_layers` alone.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence, Union

from embedforge.configs import ConfigError

logger = logging.getLogger(__name__)

LayerSpec = Union[int, list[int], dict[str, int]]
"""What a ``layers`` key holds (see the module docstring)."""

LAYERS_HELP = ("transformer layers to keep: N (the first N), [i, j, ...] (0-based, negative from the end), "
               "{every: K} (every K-th layer: K-1, 2K-1, ...) or {spread: N} (N evenly spaced, first and last "
               "included)")

MAPPING_FORMS = ("every", "spread")

# Keys that selected layers before ``layers``: each maps an old value to how ``layers`` writes it.
OLD_KEYS = {
    "keep_layers": lambda v: f"layers: {_flow(v)}",
    "first_layers": lambda v: f"layers: {_flow(v)}",
    "layer_stride": lambda v: f"layers: {{every: {_flow(v)}}}",
    "num_layers": lambda v: f"layers: {{spread: {_flow(v)}}}",
}


def _flow(value: Any) -> str:
    """A YAML flow spelling of a small value (``[1, 3]``, ``2``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


def old_key_hint(key: str, value: Any) -> str | None:
    """For a retired layer-selection key, the message that names ``layers`` and the old value's new spelling."""
    if key not in OLD_KEYS:
        return None
    try:
        spelled = OLD_KEYS[key](value)
    except Exception:  # noqa: BLE001 - an odd value: still name the new key
        spelled = "layers: ..."
    return f"no longer a key; did you mean 'layers'? (write {spelled})"


# ------------------------------------------------------------------------------------------------ selection


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layers(spec: LayerSpec | None, key: str = "layers") -> None:
    """Check a selection on its own (no model needed); raises a one-line :class:`ConfigError` naming ``key``."""
    if spec is None:
        return
    if _is_int(spec):
        if spec < 1:
            raise ConfigError(f"{key}: keep at least one layer, got {spec}", key=key)
        return
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{key}: the list is empty; name at least one layer, or leave {key} unset", key=key)
        if not all(_is_int(i) for i in spec):
            raise ConfigError(f"{key}: layer indices must be integers, got {_flow(spec)}", key=key)
        if len(set(spec)) != len(spec):
            raise ConfigError(f"{key}: a layer is listed twice in {_flow(spec)}", key=key)
        return
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in MAPPING_FORMS:
            raise ConfigError(f"{key}: a mapping holds exactly one of {', '.join(MAPPING_FORMS)} "
                              f"(e.g. {{every: 2}}), got {spec}", key=key)
        form, n = next(iter(spec.items()))
        if not _is_int(n) or n < 1:
            raise ConfigError(f"{key}.{form}: must be a positive integer, got {n!r}", key=f"{key}.{form}")
        return
    raise ConfigError(f"{key}: expected N, a list of layer indices or {{every: K}} / {{spread: N}}, got {spec!r}",
                      key=key)


def select_layers(n_total: int, spec: LayerSpec | None, *, key: str = "layers", source: str | None = None) -> list[int]:
    """The sorted 0-based indices of the layers ``spec`` keeps out of ``n_total``.

    A selection the model cannot honour (more layers than it has, an index out of range) raises a one-line
    :class:`ConfigError` naming ``key`` and the model's layer count (and ``source``, the model, when given).
    """
    check_layers(spec, key)
    where = f" ({source})" if source else ""
    if spec is None:
        return list(range(n_total))
    if _is_int(spec):
        if spec > n_total:
            raise ConfigError(f"{key}: {spec} layers asked but the model{where} has {n_total}; "
                              f"use at most {n_total}", key=key)
        return list(range(spec))
    if isinstance(spec, dict):
        form, n = next(iter(spec.items()))
        if form == "every":
            chosen = list(range(n - 1, n_total, n))
            if not chosen:
                raise ConfigError(f"{key}.every: {n} keeps no layer of the model{where}, which has {n_total}; "
                                  f"use at most {n_total}", key=f"{key}.every")
            return chosen
        if n > n_total:
            raise ConfigError(f"{key}.spread: {n} layers asked but the model{where} has {n_total}; "
                              f"use at most {n_total}", key=f"{key}.spread")
        if n == 1:
            return [0]
        return sorted({round(i * (n_total - 1) / (n - 1)) for i in range(n)})
    bad = [i for i in spec if not -n_total <= i < n_total]
    if bad:
        named = f"layer index {bad[0]} is" if len(bad) == 1 else f"layer indices {_flow(bad)} are"
        raise ConfigError(f"{key}: {named} out of range for the model{where}, which has {n_total} layers "
                          f"(0..{n_total - 1}, or -{n_total}..-1)", key=key)
    chosen = [i % n_total for i in spec]
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"{key}: {_flow(list(spec))} names the same layer twice for a model with {n_total} "
                          f"layers{where}", key=key)
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------ surgery

_LAYER_LIST_NAMES = ("layers", "layer", "h", "block", "blocks")


def hf_model(model: Any) -> Any:
    """The transformers model: the first module's ``auto_model`` of a SentenceTransformer, else ``model``."""
    import torch.nn as nn

    if not isinstance(model, nn.Sequential):  # a SentenceTransformer is a Sequential of modules
        if not hasattr(getattr(model, "config", None), "num_hidden_layers"):
            raise TypeError(f"{type(model).__name__} is neither a transformers model nor a SentenceTransformer")
        return model
    first = model[0]
    found = getattr(first, "auto_model", None)
    if found is None:
        raise TypeError(f"the first module ({type(first).__name__}) holds no transformers model")
    return found


def layer_list(model: Any) -> tuple[Any, str, Any]:
    """The ``nn.ModuleList`` of transformer blocks: (parent module, attribute name, list).

    The shallowest ModuleList whose length is ``config.num_hidden_layers``, preferring the usual names
    (``layers`` in decoders, ``encoder.layer`` in BERT); works through a peft wrapper.
    """
    import torch.nn as nn

    hf = hf_model(model)
    n = getattr(hf.config, "num_hidden_layers", None)
    best: tuple[tuple[int, int], Any, str, Any] | None = None
    for name, module in hf.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                rank = (0 if attr in _LAYER_LIST_NAMES else 1, name.count(".") + (1 if name else 0))
                if best is None or rank < best[0]:
                    best = (rank, module, attr, child)
    if best is None:
        raise TypeError(f"{type(hf).__name__}: no list of {n} transformer layers found")
    return best[1], best[2], best[3]


def count_layers(model: Any) -> int:
    """How many transformer layers the model (or SentenceTransformer) has."""
    return len(layer_list(model)[2])


def keep_layers(model: Any, indices: Sequence[int]) -> dict[str, Any]:
    """Keep only the layers ``indices`` (sorted, 0-based, unique) of the model's backbone, in place.

    ``model`` is a SentenceTransformer (its pooling heads that read several hidden states follow the cut) or a
    transformers model. Updates ``config.num_hidden_layers``, ``config.layer_types`` and every ``layer_idx`` so
    the saved directory reloads as the smaller architecture. Returns a summary for lineage.
    """
    import torch.nn as nn

    hf = hf_model(model)
    parent, attr, layers = layer_list(hf)
    n = len(layers)
    keep = [int(i) for i in indices]
    if not keep or any(not 0 <= k < n for k in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
        raise ValueError(f"layers to keep must be sorted unique indices in [0, {n}), got {keep}")
    heads = [] if hf is model else _remap_layer_heads(model, n, keep)  # checked before anything changes
    setattr(parent, attr, nn.ModuleList([layers[k] for k in keep]))
    for head, new_layers in heads:
        head.layers = new_layers
        head.num_hidden_states = len(keep) + 1
    config = hf.config
    config.num_hidden_layers = len(keep)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        config.layer_types = [types[k] for k in keep]
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    logger.info("kept %d of %d layers: %s", len(keep), n, keep)
    return {"layers_before": n, "layers_after": len(keep), "kept_layers": keep}


def _remap_layer_heads(model: Any, n_layers: int, keep: list[int]) -> list[tuple[Any, list[int]]]:
    """New hidden-state indices for pooling heads that read several layers (``layers`` + ``num_hidden_states``).

    Hidden state 0 is the embedding output and state ``i`` the output of layer ``i - 1``; a head follows the cut
    only if every layer it reads is kept.
    """
    out = []
    for module in model.modules():
        states = getattr(module, "num_hidden_states", None)
        reads = getattr(module, "layers", None)
        if states != n_layers + 1 or not isinstance(reads, list) or not all(_is_int(i) for i in reads):
            continue
        missing = [h for h in reads if h > 0 and (h - 1) not in keep]
        if missing:
            raise ConfigError(f"layers: {type(module).__name__} reads hidden states {missing} (outputs of layers "
                              f"{[h - 1 for h in missing]}), which the selection drops; keep those layers",
                              key="layers")
        out.append((module, [0 if h == 0 else keep.index(h - 1) + 1 for h in reads]))
    return out


def apply_layers(model: Any, spec: LayerSpec | None, *, key: str = "layers",
                 source: str | None = None) -> dict[str, Any] | None:
    """Select with :func:`select_layers` on the model's layer count and cut it there; None when ``spec`` is None."""
    if spec is None:
        return None
    return keep_layers(model, select_layers(count_layers(model), spec, key=key, source=source))
