"""Callbacks: throughput/MFU, sample logging, the RLHF rollouts (PPO, rejection sampling), and the run's
bookkeeping (how a fit ended, which tokenizer a checkpoint belongs to)."""

from llama2_lightning.callbacks.chat_samples import ChatSamples
from llama2_lightning.callbacks.ppo import PPOCallback
from llama2_lightning.callbacks.rejection_sampling import RejectionSamplingCallback
from llama2_lightning.callbacks.run_status import RunStatus
from llama2_lightning.callbacks.samples import GenerationSamples
from llama2_lightning.callbacks.throughput import LlamaThroughputMonitor, measure_matmul_peak
from llama2_lightning.callbacks.tokenizer_stamp import TokenizerStamp

__all__ = [
    "ChatSamples", "GenerationSamples", "LlamaThroughputMonitor", "PPOCallback", "RejectionSamplingCallback",
    "RunStatus", "TokenizerStamp", "measure_matmul_peak",
]
