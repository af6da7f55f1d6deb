"""flax_adapters: parameter-efficient fine-tuning of LLMs in JAX/Flax.

    import flax_adapters as fa

    pre = fa.load_pretrained("path/to/model")          # HF directory, .gguf or hub id
    adapted = fa.adapt(pre, fa.LoraConfig(r=8), jax.random.key(0))
    frozen, trainable = adapted.split()                # train `trainable` only
    fa.save_adapter(adapted.params, adapted.cfg, "out/adapter", adapted.model_type)
    tree, cfg = fa.load_adapter("out/adapter", pre.params, adapted.model_type)

The functions over parameter trees (`inject`, `split`, `combine`, `merge`,
...) are the same operations without the handle. Layers, from the bottom:
quant.array / tree / activations / sharding -> adapters (the maths of each
method and its registration) -> models (families, Hugging Face names) ->
api / step / generate -> checkpoints (every on-disk format) -> this face.
"""

from flax_adapters.adapters import (METHODS, BottleneckConfig, FullConfig, IA3Config, LoraConfig,
                                    PrefixConfig, PromptTuningConfig, PTuningConfig)
from flax_adapters.api import (Adapted, activate, adapt, adapted_base, inject, materialize, merge,
                               settings_for, split, trainable, trainable_report, unmerge)
from flax_adapters.checkpoints import (Pretrained, default_model_path, load_adapter,
                                       load_pretrained, save_adapter)
from flax_adapters.generate import GenerationConfig, generate, generate_text
from flax_adapters.models.registry import model_class
from flax_adapters.quant.params import QuantConfig
from flax_adapters.step import TrainState, make_optimizer, train_step
from flax_adapters.tree import combine, num_params

__version__ = "0.1.0"

__all__ = ["Adapted", "BottleneckConfig", "FullConfig", "GenerationConfig", "IA3Config",
           "LoraConfig", "METHODS", "PTuningConfig", "PrefixConfig", "Pretrained",
           "PromptTuningConfig", "QuantConfig", "TrainState", "activate", "adapt",
           "adapted_base", "combine", "default_model_path", "generate", "generate_text",
           "inject", "load_adapter", "load_pretrained", "make_optimizer", "materialize", "merge",
           "model_class", "num_params", "save_adapter", "settings_for", "split", "train_step",
           "trainable", "trainable_report", "unmerge"]
