"""Weight-only quantization of a frozen base: int8 and NF4 (QLoRA).

array.py: the QuantizedArray pytree, quantize / dequantize and the model
ops that dequantize inside the jitted computation; params.py: which leaves
of a base tree are quantized (QuantConfig, quantize_params); codes.py: the
NF4 and 8-bit dynamic code books. Import the submodules directly (this file
imports nothing, so layers and adapters can import array.py without cycles).
"""
