"""Loading base weights (HF safetensors, GGUF) without PyTorch."""

from flax_adapters.checkpoints.load import Pretrained, default_model_path, load_pretrained

__all__ = ["Pretrained", "default_model_path", "load_pretrained"]
