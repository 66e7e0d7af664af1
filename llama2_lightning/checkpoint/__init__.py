"""Checkpoint import and export: Meta's release format, Hugging Face's Llama format, Lightning ``.ckpt``, GGUF.

Every loader returns ``(LlamaConfig, state_dict)`` with this package's parameter names (which are
Meta's), checked against the shapes the config implies, so a conversion is ``load_*`` then
``save_*``. Loading never executes pickled code: ``.pth``/``.bin``/``.ckpt`` files are read with
``torch.load(weights_only=True)`` and Hugging Face weights preferably from safetensors. One file per
format: :mod:`.meta`, :mod:`.hf`, :mod:`.lightning`, :mod:`.gguf`; :mod:`.load` dispatches on the format.
"""

from llama2_lightning.checkpoint.gguf import load_gguf, read_gguf, save_gguf
from llama2_lightning.checkpoint.hf import load_hf, save_hf, save_hf_sequence_classification
from llama2_lightning.checkpoint.lightning import load_lightning, save_lightning
from llama2_lightning.checkpoint.load import (
    EXPORT_FORMATS,
    FORMATS,
    detect_format,
    load_checkpoint,
    load_model,
    read_config,
    save_checkpoint,
)
from llama2_lightning.checkpoint.meta import load_meta, save_meta
from llama2_lightning.checkpoint.state_dict import StateDict, check_state_dict, expected_shapes

__all__ = [
    "EXPORT_FORMATS", "FORMATS", "StateDict", "check_state_dict", "detect_format", "expected_shapes", "load_checkpoint",
    "load_gguf", "load_hf", "load_lightning", "load_meta", "load_model", "read_config", "read_gguf", "save_checkpoint",
    "save_gguf", "save_hf", "save_hf_sequence_classification", "save_lightning", "save_meta",
]
