"""Tokens/s and model FLOPs utilisation via Lightning's ThroughputMonitor."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from llama2_lightning.modules.common import unpack_lm_batch


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0,
                        device: torch.device | str = "cpu") -> float:
    """Achieved FLOP/s of a square matmul: the denominator for MFU on machines whose peak Lightning does
    not know (CPUs). A measured peak, not a datasheet one, so MFU reads as "fraction of what this box can do".

    Measured through ``F.linear``, the op every projection of the model uses: on CPUs without native
    bf16, a bf16 ``a @ b`` takes a generic kernel ~35x slower than ``linear``'s oneDNN path (0.8 vs 28
    GFLOP/s measured on a 2-core EPYC), which would make any bf16 MFU read far above 100%."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):  # warm-up: thread pool, caches, lazy kernel selection
        torch.nn.functional.linear(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.nn.functional.linear(a, b)  # a @ b.T: 2 * size**3 FLOPs
        n += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start)


class LlamaThroughputMonitor(ThroughputMonitor):
    """ThroughputMonitor wired to our ``(input_ids, labels)`` batches, configurable from YAML.

    Args:
        window_size: batches averaged per reading.
        peak_flops: the device's peak FLOP/s for MFU; ``None`` asks Lightning (known GPUs), and on CPU
            measures a matmul peak at start-up when ``measure_cpu_peak`` is set.
    """

    def __init__(self, window_size: int = 50, peak_flops: float | None = None, measure_cpu_peak: bool = True) -> None:
        super().__init__(
            batch_size_fn=lambda batch: unpack_lm_batch(batch)[0].size(0),
            length_fn=lambda batch: unpack_lm_batch(batch)[0].numel(),
            window_size=window_size,
        )
        self.peak_flops = peak_flops
        self.measure_cpu_peak = measure_cpu_peak

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        available = self.peak_flops
        if available is None and self.available_flops is None and trainer.strategy.root_device.type == "cpu" \
                and self.measure_cpu_peak:
            available = measure_matmul_peak(torch.float32)
        if available is not None:
            self.available_flops = int(available)
            for throughput in self._throughputs.values():
                throughput.available_flops = int(available)

    def state_dict(self) -> dict[str, Any]:
        return {}
