"""Callbacks: throughput/MFU, sample logging (and the RLHF callbacks, later)."""

from llama2_lightning.callbacks.chat_samples import ChatSamples
from llama2_lightning.callbacks.samples import GenerationSamples
from llama2_lightning.callbacks.throughput import LlamaThroughputMonitor, measure_matmul_peak

__all__ = ["ChatSamples", "GenerationSamples", "LlamaThroughputMonitor", "measure_matmul_peak"]
