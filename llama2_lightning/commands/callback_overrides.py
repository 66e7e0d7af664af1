"""Setting a configured callback's argument from the ``fit`` command line.

jsonargparse's ``--trainer.callbacks.ARG=VALUE`` reaches only the last callback of the list. This adds the
class-name form the pipeline's ``set:`` keys already use::

    llama2-lightning fit --config configs/rlhf/tiny-ppo.yaml --trainer.callbacks.PPOCallback.init_args.kl_coef=0.02

``NAME`` is the class name of exactly one configured callback; ``KEY`` must be one of its ``__init__``
arguments; ``VALUE`` is read as YAML (``0.02``, ``true``, ``[1, 2]``, ``null``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from typing import Any

import yaml

_OPTION = re.compile(r"--trainer\.callbacks\.([A-Z]\w*)\.init_args\.(\w+)(?:=(.*))?", re.S)


def split_callback_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str, Any]]]:
    """``argv`` without the class-name callback options, and those options as ``(class name, key, value)``."""
    rest: list[str] = []
    overrides: list[tuple[str, str, Any]] = []
    items = list(argv)
    i = 0
    while i < len(items):
        match = _OPTION.fullmatch(items[i])
        if match is None:
            rest.append(items[i])
            i += 1
            continue
        name, key, value = match.groups()
        if value is None:  # "--option VALUE"
            if i + 1 >= len(items):
                raise ValueError(f"{items[i]}: expected a value")
            value, i = items[i + 1], i + 1
        overrides.append((name, key, yaml.safe_load(value)))
        i += 1
    return rest, overrides


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def apply_callback_overrides(callbacks: Sequence[Any] | None, overrides: Sequence[tuple[str, str, Any]]) -> None:
    """Set each override in the parsed ``trainer.callbacks`` list (jsonargparse namespaces with
    ``class_path`` and ``init_args``); an unknown class name or argument is a ``ValueError`` naming the
    choices."""
    entries = list(callbacks or [])
    for name, key, value in overrides:
        option = f"--trainer.callbacks.{name}.init_args.{key}"
        matches = [cb for cb in entries if str(getattr(cb, "class_path", "")).rsplit(".", 1)[-1] == name]
        if len(matches) != 1:
            names = sorted(str(getattr(cb, "class_path", "?")).rsplit(".", 1)[-1] for cb in entries)
            raise ValueError(f"{option}: {len(matches)} configured callbacks are named {name!r}; "
                             f"the configured ones are {names}")
        allowed = _init_parameters(str(matches[0].class_path))
        if key not in allowed:
            raise ValueError(f"{option}: {name} has no argument {key!r}; its arguments are {allowed}")
        matches[0].init_args[key] = value
