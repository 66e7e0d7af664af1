"""A model's own chat template (Jinja, as shipped in ``tokenizer_config.json`` or a GGUF file's
``tokenizer.chat_template``), rendered the way the Hugging Face ecosystem renders it, with the
answer-only loss mask of :func:`llama2_lightning.chat.encode_dialog`.

Rendering runs in Jinja's immutable sandbox (a template is data from a downloaded file) with
``trim_blocks``/``lstrip_blocks``, and offers what such templates call: ``raise_exception``, the
``tojson`` filter and ``strftime_now``, with ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token`` in scope.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Values of a `chat_template` config key that are not a path to a template file.
LLAMA2_FORMAT = "llama2"
MODEL_TEMPLATE = "model"


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class ChatTemplate:
    """A compiled Jinja chat template. ``render(messages, add_generation_prompt)`` is its text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "chat template") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"{name}:{err.lineno}: invalid Jinja template ({err.message})") from err
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as err:
            raise ValueError(f"{self.name}: rendering failed: {err}") from err


def resolve_chat_template(spec: str | os.PathLike[str] | None, tokenizer: Any) -> ChatTemplate | None:
    """The template a ``chat_template`` config key names: ``"llama2"`` (or ``None``) for the Llama 2-Chat
    format (returns ``None``), ``"model"`` for the tokenizer's own template, else a ``.jinja`` file."""
    if spec is None or str(spec) == LLAMA2_FORMAT:
        return None
    bos = _token_text(tokenizer, tokenizer.bos_id)
    eos = _token_text(tokenizer, tokenizer.eos_id)
    if str(spec) == MODEL_TEMPLATE:
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ValueError(f"chat_template='model' but {tokenizer.model_path} comes with no chat template "
                             "(tokenizer_config.json / chat_template.jinja / GGUF tokenizer.chat_template)")
        return ChatTemplate(source, bos, eos, name=f"{tokenizer.model_path} chat template")
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"chat_template={str(spec)!r}: expected {LLAMA2_FORMAT!r}, {MODEL_TEMPLATE!r} or a "
                         "Jinja template file")
    return ChatTemplate(path.read_text(encoding="utf-8"), bos, eos, name=str(path))


def _token_text(tokenizer: Any, token_id: int) -> str:
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        return hf.id_to_token(token_id) or ""
    sp = getattr(tokenizer, "sp", None)
    return sp.id_to_piece(token_id) if sp is not None else ""


def encode_with_template(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict[str, Any]],
                         open_turn: bool, train: Sequence[bool]) -> tuple[list[int], list[bool]]:
    """(ids, mask) of ``messages`` rendered by ``template``; ``train[i]`` says whether assistant message
    ``i`` carries the loss. The answer of message ``i`` is the text between rendering ``messages[:i]``
    with a generation prompt and rendering ``messages[:i+1]``; the mask covers the tokens that start in
    it, through its last EOS (ChatML's ``<|im_end|>``), not the separator after it. The dialog is
    tokenised once, as a whole, so the ids are exactly the ecosystem's; a token that straddles the
    start of an answer (BPE may merge the template's newline with an answer's leading space) starts
    in the prompt and is not trained on."""
    full = template.render(messages, add_generation_prompt=open_turn)
    spans: list[tuple[int, int, bool]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"message {i}: {template.name} does not render the dialog as a sequence of turns "
                             "(a shorter dialog's text is not a prefix of the longer one's), so the answer "
                             "tokens cannot be located for the loss mask")
        spans.append((len(before), len(through), bool(train[i])))
    ids, offsets = tokenizer.encode_template_offsets(full)
    mask = [False] * len(ids)
    for begin, end, trained in spans:
        inside = [k for k, (start, _) in enumerate(offsets) if begin <= start < end]
        if not trained or not inside:
            continue
        eos = [k for k in inside if ids[k] == tokenizer.eos_id]
        for k in inside:
            mask[k] = k <= (eos[-1] if eos else inside[-1])
    return ids, mask
