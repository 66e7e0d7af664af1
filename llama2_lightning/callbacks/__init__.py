"""Callbacks: throughput/MFU, sample logging, and the RLHF rollouts (PPO, rejection sampling)."""

from llama2_lightning.callbacks.chat_samples import ChatSamples
from llama2_lightning.callbacks.ppo import PPOCallback
from llama2_lightning.callbacks.rejection_sampling import RejectionSamplingCallback
from llama2_lightning.callbacks.samples import GenerationSamples
from llama2_lightning.callbacks.throughput import LlamaThroughputMonitor, measure_matmul_peak

__all__ = [
    "ChatSamples", "GenerationSamples", "LlamaThroughputMonitor", "PPOCallback", "RejectionSamplingCallback",
    "measure_matmul_peak",
]
