"""The files around a tokenizer: Hugging Face's special-token and chat-template files, and the
``tokenizer.*`` fields of a GGUF file, turned into a ``tokenizer.json`` and back.

GGUF stores a byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``) as its token strings in id
order, its merges, a type per token (1 normal, 3 control, 4 user-defined...) and the name of llama.cpp's
pre-tokenizer (``tokenizer.ggml.pre``), which fixes how text is split before BPE. Each supported name
maps to the same splitting rules expressed with ``tokenizers``' pre-tokenizers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's split (tiktoken's cl100k-style pattern): contractions, letters, up to 3 digits, punctuation.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer names whose rules are GPT-2's regex after isolating every digit.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2 = ("gpt2", "default", "gpt-2")

_ROLE_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
             "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a token as a string or as an AddedToken dict.
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_text(value: Any) -> str | None:
    if isinstance(value, list):  # a list of named templates; "default" is the chat one
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default")
    return value if isinstance(value, str) else None


def read_special_tokens(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """BOS/EOS/pad/unk token strings and the chat template beside a ``tokenizer.json``, from
    ``tokenizer_config.json``, then ``special_tokens_map.json``, then ``chat_template.jinja``
    (transformers >= 4.43 writes the template there). ``source`` says which files were read."""
    directory = Path(directory)
    found: dict[str, Any] = {}
    read = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if not path.is_file():
            continue
        read.append(str(path))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
        for role in _ROLE_IDS:
            if found.get(role) is None and _token_content(data.get(role)) is not None:
                found[role] = _token_content(data[role])
        if found.get("chat_template") is None and _template_text(data.get("chat_template")) is not None:
            found["chat_template"] = _template_text(data["chat_template"])
        if found.get("add_bos_token") is None and isinstance(data.get("add_bos_token"), bool):
            found["add_bos_token"] = data["add_bos_token"]
    jinja = directory / "chat_template.jinja"
    if found.get("chat_template") is None and jinja.is_file():
        read.append(str(jinja))
        found["chat_template"] = jinja.read_text(encoding="utf-8")
    found["source"] = ", ".join(read) or f"no tokenizer_config.json or special_tokens_map.json in {directory}"
    return found


# ---------------------------------------------------------------------------------------------- GGUF -> json
def _pre_tokenizer(pre: str, source: str) -> tuple[Any, bool]:
    """``tokenizers`` pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` name, and whether BPE
    looks a whole pre-token up before merging (Llama 3's ``ignore_merges``)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level, False
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre == "llama-bpe":
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex]), True
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                     f"{sorted((*_GPT2, *_DIGITS_THEN_GPT2, 'llama-bpe'))}")


def tokenizer_json_from_gguf_fields(meta: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(``tokenizer.json`` text, special tokens as :func:`read_special_tokens` returns them) from a
    GGUF file's metadata (``gguf_writer``-style keys, arrays as lists)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') vocabularies are "
                         "converted (for a SentencePiece one, pass the model's tokenizer.model)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre_tokenizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    special: dict[str, Any] = {"source": f"{source} (GGUF metadata)"}
    for role, key in _ROLE_IDS.items():
        if meta.get(key) is not None and 0 <= int(meta[key]) < len(tokens):
            special[role] = tokens[int(meta[key])]
    if meta.get("tokenizer.chat_template"):
        special["chat_template"] = meta["tokenizer.chat_template"]
    if meta.get("tokenizer.ggml.add_bos_token") is not None:
        special["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    return tok.to_str(), special


def gguf_tokenizer_json(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    return tokenizer_json_from_gguf_fields(meta, str(path))


def write_hf_tokenizer_files(tokenizer_json: str, special: Mapping[str, Any], dst: str | os.PathLike[str]) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` with the special tokens and chat template."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    config: dict[str, Any] = {role: special[role] for role in _ROLE_IDS if special.get(role) is not None}
    if special.get("add_bos_token") is not None:
        config["add_bos_token"] = special["add_bos_token"]
    if special.get("chat_template"):
        config["chat_template"] = special["chat_template"]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


# ---------------------------------------------------------------------------------------------- json -> GGUF
def _pre_name(pre: Mapping[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer``."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else ([pre] if pre else [])
    shape = [s.get("type") for s in steps]
    if shape == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if shape == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if shape == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_PATTERN:
        return "llama-bpe"
    raise ValueError(f"tokenizer.json pre_tokenizer {shape} has no llama.cpp equivalent this exporter knows")


def hf_gguf_fields(tokenizer_json: str, bos_id: int, eos_id: int, pad_id: int,
                   chat_template: str | None, add_bos: bool = False) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF fields of a byte-level BPE ``tokenizer.json``."""
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("only byte-level BPE tokenizer.json files export to GGUF (tokenizer.ggml.model 'gpt2')")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens") or []}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    types = [(CONTROL if added[t].get("special") else USER_DEFINED) if t in added else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(data.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos_id, "tokenizer.ggml.eos_token_id": eos_id,
        "tokenizer.ggml.padding_token_id": pad_id, "tokenizer.ggml.add_bos_token": add_bos,
    }
    if chat_template:
        fields["tokenizer.chat_template"] = chat_template
    return fields


def sentencepiece_gguf_fields(model_bytes: bytes, chat_template: str | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF fields of a SentencePiece model (llama.cpp's ``"llama"`` tokenizer):
    pieces, scores and types in id order, as llama.cpp's own converter writes them."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    types = []
    for i in range(sp.get_piece_size()):
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                     else UNUSED if sp.is_unused(i) else NORMAL)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(sp.get_piece_size())],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }
    if sp.pad_id() >= 0:
        fields["tokenizer.ggml.padding_token_id"] = sp.pad_id()
    if chat_template:
        fields["tokenizer.chat_template"] = chat_template
    return fields
