"""Weight-only quantization of a frozen base: int8 and NF4 (QLoRA).

array.py: the QuantizedArray pytree, quantize / dequantize and the model
ops that dequantize inside the jitted computation (the floor of the
library: models and adapters read quantized weights through it); codes.py:
the NF4 and 8-bit dynamic code books; params.py: which leaves of a base
tree are quantized (QuantConfig, quantize_params; it names modules as
Hugging Face does, so it sits above models). Import the submodules
directly: this file imports nothing.
"""
