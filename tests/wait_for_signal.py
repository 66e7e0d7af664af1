"""A test callback that holds a training run at a known step until the test signals it, so tests
of SIGTERM and locking act on a run in a known state without timing assumptions. Imported by the
`fit` subprocesses of those tests (their PYTHONPATH includes tests/)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class WaitForSignal(L.Callback):
    """At ``global_step == at_step`` touch ``ready_file`` and wait until SIGTERM arrives (or
    ``give_up_s`` passes, so a broken test cannot hang forever). Does nothing once
    ``ready_file`` exists: a resumed run goes straight on."""

    def __init__(self, ready_file: str, at_step: int = 2, give_up_s: float = 300.0) -> None:
        self.ready_file = Path(ready_file)
        self.at_step = at_step
        self.give_up_s = give_up_s
        self._armed = not self.ready_file.exists()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if not self._armed or trainer.global_step != self.at_step:
            return
        self._armed = False
        self.ready_file.write_text("ready\n")
        deadline = time.monotonic() + self.give_up_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)
