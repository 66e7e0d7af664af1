"""Which weights a stage trains (``FinetuneArgs``): LoRA adapters through ``peft``, or the top N blocks.

LoRA is peft's own (``LoraConfig`` + ``inject_adapter_in_model``, which works on any ``nn.Module``): each
target ``nn.Linear`` of our ``Transformer`` becomes a ``peft`` LoRA layer whose frozen weight is
``<name>.base_layer.weight`` and whose adapters are ``<name>.lora_A.default.weight`` (r, in) and
``<name>.lora_B.default.weight`` (out, r). Everything else is frozen by peft; a scalar head is not part of
the trunk it adapts, so it still trains.

Checkpoints stay in Meta's layout, so every reader (the next stage's ``init_from``, ``convert``, ``chat``,
reward scoring, the pipeline report) loads them strictly as a plain model: :func:`merge_adapters` writes
each adapted weight's merged value ``W + (alpha / r) B A`` (peft's ``get_delta_weight``) under its Meta
name in ``state_dict``, and moves the adapters and the frozen ``W`` itself under ``checkpoint["lora"]``.
A resumed run (``--ckpt_path``) gets them back from there (:func:`restore_adapters`): exactly, since ``W``
is stored rather than recovered from the rounded merge, and without the ``init_from`` it started from
(a reward model's checkpoint forgets it). The price is a second copy of the adapted weights in each
LoRA checkpoint (the optimiser state it saves instead is tiny).

Only an unsharded model is adapted: under ``ModelParallelStrategy`` (FSDP2 / tensor parallelism) the
merge would have to gather DTensors and write sharded checkpoints, which is not built; it is refused.
``trainable_blocks`` alone only sets ``requires_grad`` and works sharded too.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import lightning as L
from torch import Tensor, nn

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.modules.args import FinetuneArgs, as_args

ADAPTER = "default"  # peft's adapter name; in the keys below
LORA_KEY = "lora"  # checkpoint["lora"] = {"adapters": {...}, "base": {...}, "finetune": {...}}
# Meta names of the attention maps (Attention); the rest of LORA_TARGETS are FeedForward's
ATTENTION_MAPS = frozenset({"wq", "wk", "wv", "wo"})


def finetune_group(module: L.LightningModule, key: str, value: FinetuneArgs | dict[str, Any] | None,
                   config: LlamaConfig | None, default: FinetuneArgs | None = FinetuneArgs()) -> FinetuneArgs | None:
    """``value`` as ``FinetuneArgs`` (a checkpoint's dict too; ``None``: ``default``), checked against the
    model's depth (``config``, when known before the weights) and stored in ``module.hparams[key]`` as a
    plain dict (weights_only checkpoints)."""
    args = None if value is None and default is None else as_args(FinetuneArgs, value, default or FinetuneArgs())
    top = args.trainable_blocks if args is not None else None
    if config is not None and top is not None and top > config.n_layers:
        raise ValueError(f"{key}.trainable_blocks={top} exceeds the model's n_layers={config.n_layers}")
    module.hparams[key] = asdict(args) if args is not None else None
    return args


def apply_finetune(trunk: Transformer, args: FinetuneArgs, key: str = "finetune", device_mesh: Any = None) -> None:
    """Freeze ``trunk`` (a loaded ``Transformer``, or a scalar model's trunk) down to what ``args`` trains,
    injecting peft's LoRA adapters where asked. Frozen parameters stay out of the optimiser
    (``optim.param_groups`` skips them) and get no gradient."""
    if args.is_full:
        return
    n_layers, top = trunk.config.n_layers, args.trainable_blocks
    if top is not None and top > n_layers:
        raise ValueError(f"{key}.trainable_blocks={top} exceeds the model's n_layers={n_layers}")
    first = n_layers - top if top is not None else 0  # the lowest block that trains
    if args.lora_rank is None:
        trunk.tok_embeddings.requires_grad_(False)  # a tied LM head is this table: frozen with it
        for layer in trunk.layers[:first]:
            layer.requires_grad_(False)
        return
    if device_mesh is not None:
        raise ValueError(f"{key}.lora_rank={args.lora_rank}: LoRA is not supported on a sharded model "
                         "(ModelParallelStrategy); train on one process (trainer.strategy: auto), or use "
                         f"{key}.trainable_blocks, which works sharded")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError(f"{key}.lora_rank needs peft: pip install 'peft>=0.13' ({err})") from None
    targets = list(args.lora_targets)
    if top is not None:
        # the top blocks' maps by full name (trunk.layers.<i>.<attention|feed_forward>.<map>): peft's
        # layers_to_transform needs a "." before "layers" in older releases, which a root ModuleList lacks
        targets = [f"layers.{i}.{'attention' if t in ATTENTION_MAPS else 'feed_forward'}.{t}"
                   for i in range(first, n_layers) for t in targets]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, trunk, adapter_name=ADAPTER)  # in place; freezes all but the adapters


def adapted_layers(module: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers in ``module`` by qualified name (``model.layers.0.attention.wq``); none, without
    importing peft, when peft was never imported (nothing can hold its layers then)."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _keys(name: str) -> tuple[str, str, str, str]:
    """(Meta name, frozen weight, A, B) state-dict keys of the adapted linear map ``name``."""
    return (f"{name}.weight", f"{name}.base_layer.weight", f"{name}.lora_A.{ADAPTER}.weight",
            f"{name}.lora_B.{ADAPTER}.weight")


def merge_adapters(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """For ``on_save_checkpoint``: ``state_dict`` in Meta's layout with merged weights, the adapters and
    the frozen weights under ``checkpoint["lora"]`` (module docstring). A no-op without LoRA."""
    layers = adapted_layers(module)
    if not layers:
        return
    state, renamed, adapters, base = checkpoint["state_dict"], {}, {}, {}
    for name, layer in layers.items():
        meta, frozen, a, b = _keys(name)
        weight = state[frozen]
        delta = layer.get_delta_weight(ADAPTER).detach()  # peft's (alpha / r) B A, (out, in)
        renamed[frozen] = (meta, (weight + delta.to(weight.dtype)).detach())
        base[frozen], adapters[a], adapters[b] = weight, state[a], state[b]
    merged: dict[str, Tensor] = {}
    for k, v in state.items():  # the same order, with each adapted weight back at its Meta name
        if k in renamed:
            merged[renamed[k][0]] = renamed[k][1]
        elif k not in adapters:
            merged[k] = v
    checkpoint["state_dict"] = merged
    checkpoint[LORA_KEY] = {"adapters": adapters, "base": base,
                            "finetune": {k: v for k, v in module.hparams.items() if "finetune" in k}}


def restore_adapters(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """For ``on_load_checkpoint`` (before Lightning loads ``state_dict`` strictly): put the frozen weights
    and adapters of ``checkpoint["lora"]`` back where this module's LoRA layers hold them."""
    layers, saved = adapted_layers(module), checkpoint.get(LORA_KEY)
    if not layers and saved is None:
        return
    if saved is None:
        raise ValueError("this checkpoint holds no LoRA adapters but the module has finetune.lora_rank set: "
                         "resume with the finetune settings it was written with, or start a new LoRA run from it "
                         "with init_from=CHECKPOINT")
    ours = {_keys(n)[1] for n in layers}
    if not layers or ours != set(saved["base"]):
        theirs = sorted(k.removesuffix(".base_layer.weight") for k in saved["base"])
        raise ValueError(f"the checkpoint's LoRA adapters ({len(theirs)} layers, settings {saved.get('finetune')}) "
                         f"do not match this module's ({len(layers)} layers): resume with the same finetune / "
                         "value_finetune settings, or start a new run with init_from=CHECKPOINT (its model.* "
                         "weights are merged)")
    state = checkpoint["state_dict"]
    for name in layers:
        state.pop(_keys(name)[0], None)  # the merged weight: its parts come back instead
    state.update(saved["base"])
    state.update(saved["adapters"])


__all__ = ["FinetuneArgs", "adapted_layers", "apply_finetune", "finetune_group", "merge_adapters",
           "restore_adapters", "trainable_parameters"]
