"""Chat templates: the model's own Jinja template (ChatML here) with the answer-only loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import tokenizers

from llama2_lightning.chat import encode_dialog, encode_prompt
from llama2_lightning.chat_template import ChatTemplate, resolve_chat_template
from llama2_lightning.data.prompts import Prompt, PromptDataModule
from llama2_lightning.data.sft import SFTDataModule
from llama2_lightning.gatt import encode_gatt
from llama2_lightning.tokenizer import Tokenizer
from paths import TOKENIZER as SHIPPED_MODEL
from test_tokenizer_hf import CHATML, write_bpe_tokenizer

DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the quick brown fox 😀"},
    {"role": "user", "content": "def main():\n    return 0"},
    {"role": "assistant", "content": "  jumps over\n\nthe lazy dog  "},
    {"role": "user", "content": "and 2024?"},
    {"role": "assistant", "content": "hello 巴黎"},
]


def independent_render(source: str, messages: list[dict], add_generation_prompt: bool) -> str:
    # What the ecosystem does (transformers' apply_chat_template), spelt out with plain jinja2.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt)


def check_chatml(tok: Tokenizer, json_path: Path, messages: list[dict]) -> None:
    template = resolve_chat_template("model", tok)
    ids, mask = encode_dialog(tok, messages, template=template)
    text = independent_render(tok.chat_template, messages, add_generation_prompt=False)
    reference = tokenizers.Tokenizer.from_file(str(json_path)).encode(text, add_special_tokens=False)
    assert ids == reference.ids
    # The mask covers exactly the tokens that start inside an answer or its closing <|im_end|>, found
    # here by searching the rendered text, not by rendering shorter dialogs as the package does.
    spans, cursor = [], 0
    for m in messages:
        if m["role"] == "assistant":
            begin = text.index("<|im_start|>assistant\n" + m["content"] + "<|im_end|>", cursor)
            begin += len("<|im_start|>assistant\n")
            cursor = begin + len(m["content"]) + len("<|im_end|>")
            spans.append((begin, cursor))
    expected = [any(b <= start < e for b, e in spans) for start, _ in reference.offsets]
    assert mask == expected
    assert sum(t == tok.eos_id for t, m in zip(ids, mask) if m) == len(spans)  # each answer's <|im_end|>
    # An answer without leading whitespace is exactly its own tokens, then <|im_end|>.
    plain = [m["content"] for m in messages if m["role"] == "assistant" and not m["content"][:1].isspace()]
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert all(content in masked for content in plain)


def test_chatml_matches_an_independent_render(tmp_path: Path) -> None:
    path = write_bpe_tokenizer(tmp_path)
    check_chatml(Tokenizer(path), path, DIALOG)


@pytest.mark.slow
def test_smollm2_chatml_matches_an_independent_render(smollm2_converted: Path) -> None:
    tok = Tokenizer(smollm2_converted)
    assert "<|im_start|>" in tok.chat_template
    check_chatml(tok, smollm2_converted / "tokenizer.json", DIALOG)
    # SmolLM2's template adds its own system prompt when the dialog has none.
    check_chatml(tok, smollm2_converted / "tokenizer.json", DIALOG[1:])


def test_generation_prompt_and_open_turn(tmp_path: Path) -> None:
    tok = Tokenizer(write_bpe_tokenizer(tmp_path))
    template = resolve_chat_template("model", tok)
    ids = encode_prompt(tok, DIALOG[:2], template=template)
    text = independent_render(CHATML, DIALOG[:2], add_generation_prompt=True)
    assert ids == tok.encode_template(text) and text.endswith("<|im_start|>assistant\n")


def test_gatt_with_a_template_trains_the_last_answer_only(tmp_path: Path) -> None:
    tok = Tokenizer(write_bpe_tokenizer(tmp_path))
    template = resolve_chat_template("model", tok)
    instruction = "Always answer in French."
    dialog = [{**m, "content": f"{m['content']} {instruction}"} if m["role"] == "user" else m for m in DIALOG[1:]]
    ids, mask = encode_gatt(tok, dialog, instruction, template=template)
    assert [i for i, m in zip(ids, mask) if m] == [*tok.encode(DIALOG[-1]["content"]), tok.eos_id]
    # The instruction survives once, as the system turn the template renders.
    expected = [{"role": "system", "content": instruction}, *DIALOG[1:]]
    assert ids == tok.encode_template(independent_render(CHATML, expected, add_generation_prompt=False))


def test_llama2_stays_the_default_and_bad_specs_are_errors(tmp_path: Path) -> None:
    tok = Tokenizer(write_bpe_tokenizer(tmp_path, config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    assert resolve_chat_template(None, tok) is None and resolve_chat_template("llama2", tok) is None
    with pytest.raises(ValueError, match="comes with no chat template"):
        resolve_chat_template("model", tok)
    with pytest.raises(ValueError, match="expected 'llama2', 'model' or a Jinja template file"):
        resolve_chat_template("chatml", tok)
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML)
    assert resolve_chat_template(jinja, tok).render(DIALOG[:2]).startswith("<|im_start|>system\n")
    with pytest.raises(ValueError, match="chat templates need a tokenizer.json"):
        encode_dialog(Tokenizer(SHIPPED_MODEL), DIALOG, template=ChatTemplate(CHATML))


def test_template_errors_name_the_template() -> None:
    with pytest.raises(ValueError, match="bad.jinja:1: invalid Jinja template"):
        ChatTemplate("{% for %}", name="bad.jinja")
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}", name="t")
    with pytest.raises(ValueError, match="roles must alternate"):
        raising.render(DIALOG)


def test_data_modules_take_a_chat_template_key(tmp_path: Path) -> None:
    tok_dir = write_bpe_tokenizer(tmp_path / "tok").parent
    dialogs = [DIALOG[1:3], DIALOG[3:5], DIALOG[:3]]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    dm = SFTDataModule(sources=[{"path": str(path), "format": "messages"}], tokenizer_path=str(tok_dir),
                       chat_template="model", truncation="drop", val_fraction=0.3, max_seq_len=256)
    dm.setup()
    tok = dm.tokenizer
    expected = {tuple(encode_dialog(tok, d, template=dm.template)[0][:-1]): d for d in dialogs}
    for sample in [*dm.train_dataset, *dm.val_dataset]:
        dialog = expected[tuple(sample["input_ids"].tolist())]
        answer = [*tok.encode(dialog[-1]["content"]), tok.eos_id]
        assert [t for t in sample["labels"].tolist() if t != -100] == answer
    with pytest.raises(ValueError, match="truncation='left' cuts at the Llama 2 format's turn markers"):
        SFTDataModule(tokenizer_path=str(tok_dir), chat_template="model", truncation="left")
    prompts = PromptDataModule(tokenizer_path=str(tok_dir), chat_template="model")
    assert prompts._encode(Prompt([DIALOG[1]], False, 0, "x")) == encode_prompt(tok, [DIALOG[1]], template=dm.template)
