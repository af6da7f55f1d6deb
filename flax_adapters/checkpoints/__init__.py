"""Every on-disk format: base weights from Hugging Face safetensors
directories and GGUF files (no PyTorch), adapters as PEFT or LLM-Adapters
directories, a fully fine-tuned model as a Hugging Face directory."""

from flax_adapters.checkpoints.adapter import load_adapter, save_adapter
from flax_adapters.checkpoints.load import Pretrained, default_model_path, load_pretrained

__all__ = ["Pretrained", "default_model_path", "load_adapter", "load_pretrained", "save_adapter"]
