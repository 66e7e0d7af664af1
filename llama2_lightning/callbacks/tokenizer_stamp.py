"""Record in every checkpoint which tokenizer its token ids belong to."""

from __future__ import annotations

from typing import Any

import lightning as L

from llama2_lightning.compat_checks import TOKENIZER_HASH_KEY


class TokenizerStamp(L.Callback):
    """Adds ``checkpoint["tokenizer_sha256"]``: the SHA-256 of the data module's tokenizer model, which
    :func:`~llama2_lightning.compat_checks.check_fit_start` compares when a run starts from it."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and getattr(datamodule, "tokenizer_path", None):
            checkpoint[TOKENIZER_HASH_KEY] = datamodule.tokenizer.content_hash
