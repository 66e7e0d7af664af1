"""model_answerer (llama2_lightning.evaluation.answering) on a tiny random model: answers do not depend on how
the dialogs are batched, and carry no EOS."""

from __future__ import annotations

import pytest
import torch
from paths import TOKENIZER

from llama2_lightning.evaluation.answering import model_answerer
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer


def test_answers_are_the_same_in_any_batching() -> None:
    tok = Tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = Transformer.from_name("tiny", vocab_size=tok.vocab_size).eval()
    dialogs = [[{"role": "user", "content": text}] for text in ("Hello there.", "What is the sea?", "Hi", "Tell me")]
    one = model_answerer(model, tok, max_new_tokens=8, batch_size=1)(dialogs)
    three = model_answerer(model, tok, max_new_tokens=8, batch_size=3)(dialogs)
    assert one == three and len(one) == 4
    assert all("</s>" not in a for a in one)
    with pytest.raises(ValueError, match="batch_size"):
        model_answerer(model, tok, batch_size=0)
