"""State-dict checks shared by every format: the shapes a config implies and one error listing every mismatch."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer

StateDict = dict[str, Tensor]


def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of a ``Transformer(config)``, without allocating its weights."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_state_dict(
    model_or_expected_shapes: nn.Module | Mapping[str, Sequence[int]],
    state_dict: Mapping[str, Tensor],
    source: str | os.PathLike[str],
) -> None:
    """Raise one ``ValueError`` naming ``source`` and listing every missing key, unexpected key and
    shape mismatch (``name: checkpoint (a, b) vs model (c, d)``), so a user sees the whole problem at
    once instead of the first of many ``load_state_dict`` complaints."""
    if isinstance(model_or_expected_shapes, nn.Module):
        expected = {k: tuple(v.shape) for k, v in model_or_expected_shapes.state_dict().items()}
    else:
        expected = {k: tuple(v) for k, v in model_or_expected_shapes.items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [
        f"{k}: checkpoint {fmt_shape(state_dict[k].shape)} vs model {fmt_shape(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: checkpoint does not match the model"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines.extend("    " + m for m in mismatched)
    raise ValueError("\n".join(lines))




def require_tensor_dict(obj: object, path: Path, what: str) -> StateDict:
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected {what} to be a mapping of names to tensors, got {type(obj).__name__}")
    return dict(obj)


def rename_key(name: str, top_level: Mapping[str, str], layer_key: re.Pattern[str], layers: Mapping[str, str],
               template: str) -> str | None:
    """``name`` in another format's naming: through ``top_level``, or, for a per-layer name that ``layer_key``
    matches (its last two groups: the layer index and the sub-layer), through ``layers`` into
    ``template.format(index, sub_layer)``; None when neither table knows it."""
    if name in top_level:
        return top_level[name]
    match = layer_key.fullmatch(name)
    if match and match.group(match.re.groups) in layers:
        return template.format(match.group(match.re.groups - 1), layers[match.group(match.re.groups)])
    return None
