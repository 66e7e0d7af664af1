"""Scalar (reward / value) model: padding invariance on both sides, the last-token index, the dropped
LM head, gradient flow, and score parity with transformers' LlamaForSequenceClassification."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.scalar_model import DroppedLMHead, ScalarHead, ScalarModel, last_token_index, padded_inputs

PAD = 0  # the shipped tokenizer's pad id (<unk>), never produced by encode


def tiny_model(seed: int = 0, **overrides) -> ScalarModel:
    torch.manual_seed(seed)
    trunk = Transformer(LlamaConfig.from_name("tiny", **overrides))
    # Non-unit norms so a hidden state read from the wrong place cannot coincide with the right one.
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return ScalarModel.from_transformer(trunk).eval()


def random_seqs(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2048, (n,), generator=gen) for n in lengths]


def pad_batch(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        tokens[i, sl], mask[i, sl] = s, True
    return tokens, mask


# ------------------------------------------------------------------------------------- last token


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([[1, 1, 1, 1]], [3]),  # no padding
        ([[1, 1, 0, 0], [1, 1, 1, 0]], [1, 2]),  # right padding
        ([[0, 0, 1, 1], [0, 1, 1, 1]], [3, 3]),  # left padding: sum - 1 would give 1 and 2
        ([[1, 0, 0, 0], [0, 0, 0, 1]], [0, 3]),  # single real token at either end
        ([[0, 1, 1, 0]], [2]),  # padding on both sides
    ],
)
def test_last_token_index(mask: list[list[int]], expected: list[int]) -> None:
    m = torch.tensor(mask)
    assert last_token_index(m).tolist() == expected
    assert last_token_index(m.bool()).tolist() == expected


def test_last_token_index_rejects_an_all_padding_row() -> None:
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]], dtype=torch.bool))


def test_padded_inputs_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    positions, attn = padded_inputs(mask)
    assert positions.tolist() == [[0, 0, 0, 1, 2]]
    assert attn.shape == (1, 1, 5, 5)
    # Real queries see real keys up to themselves; padding queries see only themselves.
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attn[0, 0], expected)


# ----------------------------------------------------------------------------- padding invariance


def test_score_is_the_same_alone_and_in_padded_batches() -> None:
    model = tiny_model()
    target, shorter, longer1, longer2 = random_seqs([7, 3, 11, 16])
    with torch.no_grad():
        alone = model(target[None])  # (1,), no mask at all
        alone_masked = model(target[None], torch.ones(1, 7, dtype=torch.bool))
        # Right padding: the target is padded behind; a shorter neighbour too.
        tokens, mask = pad_batch([target, longer1, shorter], "right")
        right = model(tokens, mask)
        # Left padding with longer neighbours: the target's real tokens start at slot 9.
        tokens, mask = pad_batch([longer1, target, longer2], "left")
        left = model(tokens, mask)
        left_alone = torch.stack([model(s[None])[0] for s in (longer1, target, longer2)])
    assert alone.shape == (1,) and alone.dtype == torch.float32
    torch.testing.assert_close(alone_masked, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(left[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(left, left_alone, atol=1e-5, rtol=0)
    assert torch.isfinite(left).all()


def test_left_padding_without_the_mask_would_change_the_score() -> None:
    # Guards the test above against being vacuous: the same left-padded tokens read at the right
    # index but with plain causal attention and arange positions give a different score.
    model = tiny_model()
    target, longer = random_seqs([5, 12])
    tokens, mask = pad_batch([longer, target], "left")
    with torch.no_grad():
        alone = model(target[None])[0]
        naive = model.head(model.trunk.forward_hidden(tokens)[1, -1]).float()
    assert (naive - alone).abs() > 1e-3


def test_forward_all_per_token_values_ignore_left_padding() -> None:
    model = tiny_model()
    target, longer = random_seqs([6, 10])
    tokens, mask = pad_batch([target, longer], "left")
    with torch.no_grad():
        values = model.forward_all(tokens, attention_mask=mask)  # (2, 10)
        positions, attn = padded_inputs(mask)
        explicit = model.forward_all(tokens, positions, attn)
        alone = model.forward_all(target[None])  # (1, 6)
    assert values.shape == (2, 10) and values.dtype == torch.float32
    torch.testing.assert_close(values, explicit)
    torch.testing.assert_close(values[0, 4:], alone[0], atol=1e-5, rtol=0)
    # The last per-token value is the sequence score.
    torch.testing.assert_close(values[:, -1], model(tokens, mask), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="either attention_mask or positions/mask"):
        model.forward_all(tokens, positions, attention_mask=mask)


# ------------------------------------------------------------------------------ head and trunk


def test_from_transformer_drops_the_lm_head_and_shares_the_trunk() -> None:
    torch.manual_seed(0)
    trunk = Transformer(LlamaConfig.from_name("tiny"))
    embeddings = trunk.tok_embeddings.weight
    n_trunk = trunk.num_parameters()
    config = trunk.config
    model = ScalarModel.from_transformer(trunk)

    assert model.trunk is trunk and model.trunk.tok_embeddings.weight is embeddings
    assert isinstance(trunk.output, DroppedLMHead)
    names = set(model.state_dict())
    assert "trunk.output.weight" not in names
    assert "head.score.weight" in names and model.head.score.weight.shape == (1, config.dim)
    assert names == {f"trunk.{k}" for k in Transformer(config).state_dict() if k != "output.weight"} | {
        "head.score.weight"
    }
    assert model.num_parameters() == n_trunk - config.vocab_size * config.dim + config.dim
    with pytest.raises(RuntimeError, match="LM head was dropped"):
        trunk(torch.zeros(1, 3, dtype=torch.long))
    # setup_kv_cache reads trunk.output.weight for device and dtype; the placeholder answers.
    trunk.setup_kv_cache(batch_size=1, max_seq_len=8)
    assert trunk.layers[0].attention.kv_cache.k.dtype == torch.float32
    trunk.reset_kv_cache()
    # And follows dtype casts like the real weights did.
    model.to(torch.bfloat16)
    assert trunk.output.weight.dtype == torch.bfloat16 and model.head.score.weight.dtype == torch.bfloat16


def test_keeping_the_lm_head() -> None:
    trunk = Transformer(LlamaConfig.from_name("tiny"))
    model = ScalarModel.from_transformer(trunk, drop_lm_head=False)
    assert isinstance(trunk.output, torch.nn.Linear) and "trunk.output.weight" in model.state_dict()


def test_load_trunk_state_dict_ignores_the_lm_head() -> None:
    source = Transformer(LlamaConfig.from_name("tiny"))
    model = ScalarModel.from_config(LlamaConfig.from_name("tiny"))
    model.load_trunk_state_dict(source.state_dict())
    assert torch.equal(model.trunk.layers[1].attention.wq.weight, source.layers[1].attention.wq.weight)


def test_meta_device_init_then_materialise() -> None:
    with torch.device("meta"):
        model = ScalarModel.from_config(LlamaConfig.from_name("tiny"))
    assert model.head.score.weight.is_meta and model.trunk.output.weight.is_meta
    model.to_empty(device="cpu")
    model.head.reset_parameters()
    std = model.head.score.weight.std().item()
    assert 0.5 / 65**0.5 < std < 1.5 / 65**0.5  # N(0, 1/(dim+1)), dim = 64


def test_head_init_gives_unit_scale_scores() -> None:
    head = ScalarHead(256)
    torch.manual_seed(0)
    h = torch.nn.functional.rms_norm(torch.randn(4096, 256), (256,))  # what the trunk's norm emits
    scores = head(h)
    assert scores.shape == (4096,)
    assert 0.7 < scores.std().item() < 1.4


def test_gradient_reaches_head_and_trunk() -> None:
    model = tiny_model().train()
    tokens, mask = pad_batch(random_seqs([4, 9]), "left")
    scores = model(tokens, mask)
    (scores[0] - scores[1]).backward()
    assert model.head.score.weight.grad is not None and model.head.score.weight.grad.abs().sum() > 0
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "norm.weight"):
        grad = model.trunk.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Padding tokens feed nothing back: their embedding rows get no gradient.
    assert model.trunk.tok_embeddings.weight.grad[PAD].abs().sum() == 0


def test_bad_mask_shape() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="must match tokens"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------- Hugging Face reference


def test_scores_match_transformers_sequence_classification(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from llama2_lightning.checkpoint import save_hf

    torch.manual_seed(0)
    config = LlamaConfig.from_name("tiny")
    trunk = Transformer(config)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_hf(config, trunk.state_dict(), tmp_path)  # a causal-LM checkpoint, as SFT would leave it
    model = ScalarModel.from_checkpoint(tmp_path).eval()  # the paper's RM init: LM head dropped
    assert isinstance(model.trunk.output, DroppedLMHead)

    # The export claim: the trunk in HF's layout plus head.score.weight renamed to score.weight.
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path, num_labels=1, pad_token_id=PAD)
    with torch.no_grad():
        hf.score.weight.copy_(model.head.score.weight)
    hf.eval()

    # Right padding: HF reads the rightmost non-pad token, causal attention keeps padding out.
    tokens, mask = pad_batch(random_seqs([5, 12, 8]), "right")
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask.long()).logits[:, 0]
        ours = model(tokens, mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
