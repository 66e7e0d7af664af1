"""Language-model losses shared by SFT and the RLHF rejection-sampling update."""

from __future__ import annotations

from torch import Tensor

from llama2_lightning.tensor_parallel import cross_entropy, vocab_argmax

# The label of a position that adds nothing to the loss (``F.cross_entropy``'s default ignore index).
IGNORE_INDEX = -100


def answer_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean NLL over answer tokens, number of answer tokens, number of them predicted by argmax).

    ``logits`` (B, T, V); ``labels`` (B, T) with ``IGNORE_INDEX`` off the answers. A position whose
    label is ``IGNORE_INDEX`` adds nothing to the loss or its gradient, whatever its logits. The sum is
    divided by the count clamped to 1, so a batch without answer tokens gives 0 rather than NaN.
    Vocabulary-sharded logits (tensor parallelism) are reduced where they lie, never gathered.
    """
    mask = labels != IGNORE_INDEX  # (B, T)
    n = mask.sum()
    nll = cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((vocab_argmax(logits.detach()) == labels) & mask).sum()
    return nll / n.clamp(min=1), n, correct
