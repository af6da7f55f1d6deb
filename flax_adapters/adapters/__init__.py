"""Adapter methods as pure functions over parameter trees: the maths of
each method (one file each; its forward at the model's sites, sites.py),
targeting, and the registry every other layer reads. Importing this
package registers every method."""

from flax_adapters.adapters import bottleneck, full, ia3, lora, prefix, prompt
from flax_adapters.adapters.bottleneck import BottleneckConfig
from flax_adapters.adapters.full import FullConfig
from flax_adapters.adapters.ia3 import IA3Config
from flax_adapters.adapters.lora import LoraConfig
from flax_adapters.adapters.prefix import PrefixConfig
from flax_adapters.adapters.prompt import PromptTuningConfig, PTuningConfig
from flax_adapters.adapters.registry import (METHODS, Method, Schema, by_name, by_peft_type,
                                             is_adapter_path, method_of)
from flax_adapters.adapters.targeting import Context, Presets

__all__ = ["BottleneckConfig", "Context", "FullConfig", "IA3Config", "LoraConfig", "METHODS",
           "Method", "PTuningConfig", "PrefixConfig", "Presets", "PromptTuningConfig", "Schema",
           "bottleneck", "by_name", "by_peft_type", "full", "ia3", "is_adapter_path", "lora",
           "method_of", "prefix", "prompt"]
