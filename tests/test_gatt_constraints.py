"""Checkable instructions enforced while sampling GAtt dialogs: generate's per-prompt token masks, the masks
themselves, the finishing edits, and the `gatt --enforce` command end to end on a tiny random model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from paths import TOKENIZER

from llama2_lightning import LlamaConfig, Transformer
from llama2_lightning.checkpoint import save_hf
from llama2_lightning.cli import main
from llama2_lightning.evaluation.instructions import instruction
from llama2_lightning.gatt_constraints import allowed_token_mask, finish_answer
from llama2_lightning.generation import generate


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(LlamaConfig.from_name("tiny")).eval()


def test_sampled_tokens_stay_inside_each_prompts_mask(model: Transformer) -> None:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(2, V, generator=g) < 0.01  # (2, V): a different ~1% of the vocabulary per prompt
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    # 3 samples each, one prompt per chunk: the mask must follow its prompt through chunking and repetition
    out = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=0, num_samples=3, batch_size=1,
                   allowed_tokens=allowed)
    for row, tokens in enumerate(out.as_lists()):
        assert tokens and all(allowed[row // 3, t] for t in tokens), row
    free = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=0, num_samples=3, batch_size=1)
    assert any(not allowed[row // 3, t] for row, toks in enumerate(free.as_lists()) for t in toks)


def test_masked_greedy_is_the_argmax_over_the_allowed_tokens(model: Transformer) -> None:
    V = model.config.vocab_size
    prompt = [[3, 4, 5, 6]]
    free = generate(model, prompt, max_new_tokens=1, temperature=0.0, output_logits=True)
    banned = int(free.tokens[0, 0])
    allowed = torch.ones(1, V, dtype=torch.bool)
    allowed[0, banned] = False  # the unconstrained choice is banned: the runner-up must come instead
    out = generate(model, prompt, max_new_tokens=1, temperature=0.0, allowed_tokens=allowed)
    raw = free.logits[0, 0]  # (V,) the same prefill's logits
    assert int(out.tokens[0, 0]) == int(raw.masked_fill(~allowed[0], float("-inf")).argmax()) != banned
    # its logprob is that of the constrained distribution (the banned token's mass moved to the rest)
    expected = torch.log_softmax(raw.masked_fill(~allowed[0], float("-inf")), -1)[out.tokens[0, 0]]
    torch.testing.assert_close(out.logprobs[0, 0], expected)
    with pytest.raises(ValueError, match="allowed_tokens must be"):
        generate(model, [[1, 2], [3]], max_new_tokens=1, allowed_tokens=allowed)
    with pytest.raises(ValueError, match=r"vocab_size=.*got \(1, 7\)"):  # a mask from another vocabulary
        generate(model, prompt, max_new_tokens=1, allowed_tokens=allowed[:, :7])
    with pytest.raises(ValueError, match=r"allows no token for prompts \[1\]"):
        generate(model, [[1, 2], [3]], max_new_tokens=1, allowed_tokens=torch.stack([allowed[0], allowed[0] & False]))


def test_no_e_mask_bans_the_letter_markup_and_empty_tokens_but_keeps_eos() -> None:
    texts = ["", "Hello", "HELLO", "<|im_end|>", "world", " 12", "<gh_stars>", "\ufffd"]
    mask = allowed_token_mask("no_e", texts, vocab_size=10, eos_id=3)
    assert mask.tolist() == [False, False, False, True, True, True, False, True, False, False]
    assert allowed_token_mask("capitals", texts, 10, 3) is None  # enforced by finish_answer instead
    assert allowed_token_mask("short", texts, 10, 3) is None
    with pytest.raises(ValueError, match="unknown checkable instruction 'loud'"):
        allowed_token_mask("loud", texts, 10, 3)


@pytest.mark.parametrize("answer", ["Sure, here it is.", "ok ahoy", "Fine. AHOY!", "4 x 4 = 16"])
def test_finished_answers_follow_their_instruction(answer: str) -> None:
    caps = finish_answer("capitals", answer)
    assert caps == answer.upper() and instruction("capitals").check(caps)
    ahoy = finish_answer("ahoy", answer)
    assert instruction("ahoy").check(ahoy)
    assert ahoy == answer if instruction("ahoy").check(answer) else ahoy == f"{answer} Ahoy!"
    assert finish_answer("no_e", answer) == answer and finish_answer(None, answer) == answer
    assert finish_answer("ahoy", "  ") == "  "  # an empty answer stays empty: the sampler ends the dialog


def test_gatt_enforce_writes_dialogs_that_follow_their_instruction(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = Transformer.from_name("tiny")
    save_hf(tiny.config, tiny.state_dict(), tmp_path / "hf")
    shutil.copy(TOKENIZER, tmp_path / "hf" / "tokenizer.model")
    src = tmp_path / "dialogs.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                    {"role": "user", "content": "and then?"}]}) + "\n"
                           for i in range(6)))
    out = tmp_path / "gatt.jsonl"
    base = ["gatt", "--input", str(src), "--output", str(out), "--checkpoint", str(tmp_path / "hf"),
            "--instruction-set", "checkable", "--checkable", "capitals,ahoy,no_e", "--max-new-tokens", "8",
            "--temperature", "1.0", "--seed", "3", "--require-check"]
    assert main(base) == 0
    assert out.read_text().count("\n") < 6  # a random model follows them by chance only, if ever
    assert main([*base, "--enforce"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    names = {i.text: i.name for i in map(instruction, ("capitals", "ahoy", "no_e"))}
    assert {names[r["gatt_instruction"]] for r in records} == {"capitals", "ahoy", "no_e"}
    for r in records:
        check = instruction(names[r["gatt_instruction"]]).check
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert len(answers) == 2 and all(check(a) for a in answers), r  # every turn, not only the trained one
