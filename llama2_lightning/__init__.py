"""llama2-lightning: the Llama 2 recipe as PyTorch Lightning modules."""

from llama2_lightning.config import LlamaConfig
from llama2_lightning.model import Transformer
from llama2_lightning.tokenizer import Tokenizer

__all__ = ["LlamaConfig", "Transformer", "Tokenizer"]
__version__ = "0.1.0"
