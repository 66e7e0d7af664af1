"""The real SmolLM2-135M-Instruct (llama architecture, GQA, tied embeddings, Q4_1/Q8_0 GGUF) against
transformers' own GGUF loader. Skips without the file (tests/smollm2.py says where it is looked for)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama2_lightning.checkpoint import load_model
from llama2_lightning.commands.convert import cli_convert
from llama2_lightning.generation import generate
from llama2_lightning.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at",
    "Here is a long story about a brave knight and a dragon. Chapter 1.",
    "List twenty fruits, one per line:\n",
]


@pytest.fixture(scope="module")
def ours(smollm2_converted: Path):
    return load_model(smollm2_converted).eval()


def test_converted_weights_are_transformers_dequantised_weights(smollm2_converted: Path, smollm2_transformers) -> None:
    # Both sides dequantise with gguf.quants; after our Meta -> HF row order the tensors must be identical.
    theirs = smollm2_transformers[0].state_dict()
    converted = load_file(smollm2_converted / "model.safetensors")
    assert set(converted) == set(theirs) - {"lm_head.weight"}  # tied: HF files omit lm_head
    for name, tensor in converted.items():
        assert torch.equal(tensor, theirs[name]), name


def test_logits_equal_transformers(ours, smollm2_transformers) -> None:
    theirs, tokenizer = smollm2_transformers
    for prompt in PROMPTS[:5]:
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            diff = (ours(ids) - theirs(ids).logits).abs().max().item()
        assert diff < 1e-4, (prompt, diff)


def test_greedy_generation_equals_transformers(ours, smollm2_transformers) -> None:
    theirs, tokenizer = smollm2_transformers
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    mine = generate(ours, prompts, max_new_tokens=48, temperature=0.0, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id).as_lists()
    full_length = 0
    for prompt, ids in zip(prompts, mine):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt):]
        assert ids == out.tolist(), tokenizer.decode(prompt)
        full_length += len(ids) == 48
    assert full_length >= 5


HARD = [
    "Emoji 😀🦙 and ZWJ 👩\u200d💻 family 👨\u200d👩\u200d👧",
    "日本語のテキスト、中文文本。한국어 Ελληνικά русский",
    "def f(x):\n\tif x  >= 10:\n        return x ** 2  # comment\n\n\n    return {'a': [1, 2]}",
    "    leading spaces, trailing    \n\n\n\t\t tabs \r\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567890 3.14159 1e-5 0x1F",
    "naïve café résumé ﬁ Ａ e\u0301",
    "",
]


def test_tokenizer_ids_equal_tokenizers(smollm2_converted: Path, smollm2_transformers) -> None:
    reference = smollm2_transformers[1].backend_tokenizer  # transformers' own GGUF -> tokenizers conversion
    tokenizer = Tokenizer(smollm2_converted)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    for text in HARD:
        assert tokenizer.encode_template(text) == reference.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Plain encode treats a special token's text as text: it never becomes the control id.
    assert 1 not in tokenizer.encode("<|im_start|>") and tokenizer.encode_template("<|im_start|>") == [1]


def test_f16_export_loads_in_transformers(smollm2_converted: Path, ours, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    dst = tmp_path / "smollm2-f16.gguf"
    assert cli_convert(["--from", "hf", "--to", "gguf", "--gguf-type", "F16", str(smollm2_converted), str(dst)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=dst.name, dtype=torch.float32)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=dst.name)
    # The same weights rounded to fp16, computed in fp32 on our side.
    rounded = load_model(smollm2_converted).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    tokenizer = Tokenizer(smollm2_converted)
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode_template(prompt)
        assert their_tokenizer.encode(prompt, add_special_tokens=False) == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs_logits = theirs.eval()(x).logits
            assert (theirs_logits - rounded(x)).abs().max().item() < 1e-4
            # against the unrounded fp32 model: fp16 rounding of the weights moves logits a little
            torch.testing.assert_close(theirs_logits, ours(x), atol=0.05, rtol=0.01)
