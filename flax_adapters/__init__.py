"""flax_adapters: parameter-efficient fine-tuning of LLMs in JAX/Flax."""

__version__ = "0.1.0"
