"""Using a trained reward model: load it, score answers, evaluate it on preference files, export it.

Two checkpoint layouts are read (both without executing pickled code):

* a ``RewardModule`` Lightning checkpoint (``.ckpt`` file, or the directory a sharded run writes):
  the trunk under ``model.trunk.`` and the head at ``model.head.score.weight``, with
  ``llama_config`` and ``reward_model`` plain dicts (``modules/reward.py``);
* a Hugging Face ``LlamaForSequenceClassification`` directory (``num_labels: 1``), as written by
  :func:`export_reward_model` / ``llama2-lightning export-rm``: ``model.*`` trunk tensors in HF's
  rotary row order and ``score.weight`` (1, dim).

A score is read at the last real token of ``encode_dialog(prompt + [assistant answer])`` in the
Llama 2-Chat format, the answer's EOS, exactly as the reward model was trained; ``sigmoid(score)``
is the probability the paper's safety-gated reward and its 0.15 threshold are defined on.

The commands over these functions are in :mod:`llama2_lightning.commands.score`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama2_lightning.chat import Message, encode_side, truncate_pair
from llama2_lightning.checkpoint.hf import (
    hf_to_ours_key, read_hf_weights, rotary_heads, rotary_hf_to_meta, save_hf_sequence_classification,
)
from llama2_lightning.checkpoint.lightning import consolidate_sharded, read_checkpoint_state
from llama2_lightning.checkpoint.load import detect_format
from llama2_lightning.checkpoint.safe_load import safe_torch_load
from llama2_lightning.checkpoint.state_dict import StateDict, check_state_dict, expected_shapes
from llama2_lightning.config import LlamaConfig
from llama2_lightning.scalar_model import DroppedLMHead, ScalarModel
from llama2_lightning.tokenizer import Tokenizer

# Where a RewardModule keeps its tensors (kept equal to modules/reward.py's TRUNK_PREFIX / HEAD_KEY,
# which a test checks; duplicated so loading a model never imports Lightning).
_TRUNK_PREFIX = "model.trunk."
_HEAD_KEY = "model.head.score.weight"
# Llama 2 has no pad piece; the Tokenizer pads with <unk> (id 0), which its encoder never emits.
DEFAULT_PAD_ID = 0


# ---------------------------------------------------------------------------------------------- reading
def _scalar_model_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Names and shapes of a ``ScalarModel`` state dict: the trunk's minus ``output.weight``, plus the head."""
    shapes = {f"trunk.{k}": v for k, v in expected_shapes(config).items() if k != "output.weight"}
    shapes["head.score.weight"] = torch.Size([1, config.dim])
    return shapes


def _lightning_checkpoint(path: Path) -> Mapping[str, Any]:
    ckpt = consolidate_sharded(path) if path.is_dir() else safe_torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a Lightning checkpoint dict, got {type(ckpt).__name__}")
    return ckpt


def _is_hf_sequence_classifier(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def is_reward_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a RewardModule checkpoint or an exported HF sequence classifier; False for a plain
    language-model checkpoint (Meta, HF causal LM, a pretraining or SFT ``.ckpt``)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        return _is_hf_sequence_classifier(path)
    if fmt != "lightning":
        return False
    # mmap'd, weights_only: the tensors are not read, only the dict's structure (a sharded directory's
    # meta.pt holds no state_dict; RewardModule's "reward_model" entry is there in both layouts).
    meta = read_checkpoint_state(path)
    return "reward_model" in meta or _HEAD_KEY in (meta.get("state_dict") or {})


def read_reward_checkpoint(path: str | os.PathLike[str]) -> tuple[LlamaConfig, StateDict, dict[str, Any]]:
    """``(config, state_dict, info)`` of a reward model; ``state_dict`` has ``ScalarModel`` names
    (``trunk.*`` in Meta's layout, ``head.score.weight``) and is checked against the config's
    shapes; ``info`` holds ``pad_id`` and ``tokenizer_path`` when the checkpoint records them."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        return _read_hf_reward(path)
    if fmt != "lightning":
        raise ValueError(f"{path}: not a reward model: a {fmt} checkpoint holds a language model; train one with "
                         "RewardModule (configs/reward/) or give an exported LlamaForSequenceClassification directory")
    ckpt = _lightning_checkpoint(path)
    if not isinstance(ckpt.get("llama_config"), Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ValueError(f"{path}: not a llama2-lightning checkpoint (no 'llama_config' / 'state_dict' dicts)")
    config = LlamaConfig.from_dict(dict(ckpt["llama_config"]))
    info = dict(ckpt.get("reward_model") or {})
    trunk_prefix = info.get("trunk_prefix", _TRUNK_PREFIX)
    head_key = info.get("head_key", _HEAD_KEY)
    full: Mapping[str, Tensor] = ckpt["state_dict"]
    if head_key not in full:
        raise ValueError(f"{path}: not a reward model: no head {head_key!r} in its state_dict "
                         "(a pretraining or SFT checkpoint goes to RewardModule's init_from instead)")
    state_dict = {"trunk." + k[len(trunk_prefix):]: t for k, t in full.items() if k.startswith(trunk_prefix)}
    state_dict["head.score.weight"] = full[head_key]
    check_state_dict(_scalar_model_shapes(config), state_dict, path)
    return config, state_dict, info


def _read_hf_reward(path: Path) -> tuple[LlamaConfig, StateDict, dict[str, Any]]:
    raw_config = json.loads((path / "config.json").read_text())
    if not _is_hf_sequence_classifier(path):
        raise ValueError(f"{path}: not a reward model: config.json architectures {raw_config.get('architectures')}, "
                         "expected LlamaForSequenceClassification (export one with `llama2-lightning export-rm`)")
    num_labels = raw_config.get("num_labels", len(raw_config.get("id2label") or {0: ""}))
    if num_labels != 1:
        raise ValueError(f"{path}: num_labels is {num_labels}; a reward model has one scalar output")
    config = LlamaConfig.from_hf_config(raw_config)
    state_dict: StateDict = {}
    for name, tensor in read_hf_weights(path).items():
        ours = "head.score.weight" if name == "score.weight" else "trunk." + hf_to_ours_key(name)
        state_dict[ours] = tensor
    check_state_dict(_scalar_model_shapes(config), state_dict, path)  # before reshaping rotary rows
    for name, tensor in state_dict.items():
        heads = rotary_heads(name, config)
        if heads is not None:
            state_dict[name] = rotary_hf_to_meta(tensor, heads)
    info: dict[str, Any] = {"pad_id": raw_config.get("pad_token_id")}
    if (path / "tokenizer.model").is_file():
        info["tokenizer_path"] = str(path / "tokenizer.model")
    return config, state_dict, info


def _assign_weights(model: ScalarModel, state_dict: StateDict) -> None:
    """Load a ``ScalarModel`` state dict by assignment (no copy; works on a meta-device model)."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    device = state_dict["head.score.weight"].device
    trunk = model.trunk
    # Non-persistent buffers are not in the state dict: a meta one left behind would make Lightning
    # re-materialise (re-initialise) the whole model, so give them real storage here.
    if isinstance(trunk.output, DroppedLMHead) and trunk.output.weight.is_meta:
        trunk.output = DroppedLMHead(device=device, dtype=state_dict["trunk.tok_embeddings.weight"].dtype)
    if trunk.rope_table.is_meta:
        trunk.rope_table = torch.empty_like(trunk.rope_table, device=device)
        trunk.reset_parameters()


def load_reward_weights(model: ScalarModel, path: str | os.PathLike[str]) -> None:
    """Load a reward checkpoint into ``model`` (which may live on the meta device)."""
    config, state_dict, _ = read_reward_checkpoint(path)
    if config.architecture() != model.config.architecture():
        raise ValueError(f"{path}: its config {config} differs from the model's {model.config}")
    _assign_weights(model, state_dict)


def load_reward_model_info(path: str | os.PathLike[str], device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> tuple[ScalarModel, LlamaConfig, dict[str, Any]]:
    config, state_dict, info = read_reward_checkpoint(path)
    state_dict = {k: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
                  for k, t in state_dict.items()}
    with torch.device("meta"):
        model = ScalarModel.from_config(config)  # no random init of weights about to be replaced
    _assign_weights(model, state_dict)
    model.eval()
    return model, config, info


def load_reward_model(path: str | os.PathLike[str], device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> tuple[ScalarModel, LlamaConfig]:
    """A reward model from a RewardModule checkpoint or an exported HF sequence classifier, in eval mode."""
    model, config, _ = load_reward_model_info(path, device, dtype)
    return model, config


# ---------------------------------------------------------------------------------------------- scoring
def _as_messages(prompt: str | Sequence[Message], index: int) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "user":
        raise ValueError(f"prompt {index}: a message list must end with the user turn the answer replies to")
    return messages


def encode_for_scoring(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[Message]], answers: Sequence[str],
                       max_seq_len: int) -> list[list[int]]:
    """Chat-format ids of each (prompt, answer), ending with the answer's EOS; a dialog longer than
    ``max_seq_len`` loses its oldest turns as in training (``truncate_pair``)."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts for {len(answers)} answers; give one prompt per answer")
    out = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = encode_side(tokenizer, _as_messages(prompt, i), answer)
        fitted = truncate_pair(ids, ids, max_seq_len, tokenizer.bos_id)
        if fitted is None:
            raise ValueError(f"answer {i}: its last turn (question + answer) alone is longer than the model's "
                             f"max_seq_len {max_seq_len} ({len(ids)} tokens with its context)")
        out.append(fitted[0])
    return out


@torch.no_grad()
def score_ids(model: ScalarModel, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> Tensor:
    """Scores (N,) float32 on the CPU of token sequences, right-padded in batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.trunk.tok_embeddings.weight.device
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        T = max(len(s) for s in chunk)
        tokens = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (b, T)
        mask = torch.zeros((len(chunk), T), dtype=torch.bool)  # (b, T)
        for i, s in enumerate(chunk):
            tokens[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = True
        scores.append(model(tokens.to(device), mask.to(device)).float().cpu())  # (b,)
    return torch.cat(scores) if scores else torch.zeros(0)


def score(model: ScalarModel, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[Message]],
          answers: Sequence[str], batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """``(scores, sigmoid(scores))``, each (N,) float32: the reward of each answer to its prompt.

    A prompt is a user message (str) or a chat dialog ending with the user turn being answered.
    """
    ids = encode_for_scoring(tokenizer, prompts, answers, model.config.max_seq_len)
    scores = score_ids(model, ids, tokenizer.pad_id, batch_size)
    return scores, torch.sigmoid(scores)


# ---------------------------------------------------------------------------------------------- export
def export_reward_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], pad_id: int | None = None,
                        dtype: torch.dtype | None = None, tokenizer_path: str | os.PathLike[str] | None = None) -> None:
    """Write a reward checkpoint as a Hugging Face ``LlamaForSequenceClassification`` directory.

    ``pad_id`` defaults to the one recorded in the checkpoint, else 0 (``<unk>``). The tokenizer is
    copied in (from ``tokenizer_path`` or the one the checkpoint was trained with) when found, so
    ``score``/``score-pairs`` need no ``--tokenizer`` for the export.
    """
    config, state_dict, info = read_reward_checkpoint(src)
    if dtype is not None:
        state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state_dict.items()}
    pad = pad_id if pad_id is not None else info.get("pad_id")
    pad = DEFAULT_PAD_ID if pad is None else int(pad)
    trunk = {k[len("trunk."):]: t for k, t in state_dict.items() if k.startswith("trunk.")}
    save_hf_sequence_classification(config, trunk, state_dict["head.score.weight"], dst, pad_token_id=pad)
    tok = Path(tokenizer_path) if tokenizer_path else find_tokenizer(Path(src), info)
    if tok is not None:
        shutil.copy2(tok, Path(dst) / "tokenizer.model")


def find_tokenizer(checkpoint: Path, info: Mapping[str, Any]) -> Path | None:
    """The tokenizer recorded with the checkpoint (a file or a directory holding one), else a
    ``tokenizer.model`` or ``tokenizer.json`` in or beside it."""
    candidates = [Path(info["tokenizer_path"])] if info.get("tokenizer_path") else []
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    candidates += [folder / name for name in ("tokenizer.model", "tokenizer.json") for folder in (base, base.parent)]
    return next((c for c in candidates if c.exists()), None)
