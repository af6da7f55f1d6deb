"""The quantized frozen base (quant/): NF4 and int8 against references
written here from their definitions, the model on a quantized base (logits,
every adapter method, gradients, generation, 8-device sharding), the stored
layout and byte counts, and the errors a user can cause.

References. NF4 (QLoRA, arXiv:2305.14314 sec. 3): the code values are the
normal quantiles of bitsandbytes' `create_normal_map` (rebuilt below from
`statistics.NormalDist`); a weight is cut into blocks of `block_size`
values along the contraction axis, each block divided by its absmax and
rounded to the nearest code value (argmin of the distance, in float64), the
codes packed two per byte, first in the high nibble. Double quantization:
the absmax values minus their mean, in blocks of 256 (in bitsandbytes'
order: the blocked axis last), each block divided by its absmax and rounded
to the nearest value of bitsandbytes' 8-bit dynamic map (its
`create_dynamic_map`, copied below and run with torch).

Where bitsandbytes is installed, NF4 (codes, absmax, double quantization,
dequantized weights), the code books and int8 are also compared with
bitsandbytes itself, on CPU (tests marked "bitsandbytes" below).
"""

import dataclasses
import functools
from statistics import NormalDist

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import flax_adapters as fa
from flax_adapters import sharding
from flax_adapters.adapters import axes
from flax_adapters.checkpoints.hf import abstract_params
from flax_adapters.generate import GenerationConfig, generate
from flax_adapters.models import LlamaConfig, LlamaForCausalLM, logical_axes
from flax_adapters.models.config import LLAMA_7B
from flax_adapters.quant import codes
from flax_adapters.quant.array import QuantizedArray, dequantize, quantize, stored_bytes, take
from flax_adapters.quant.params import QuantConfig, dequantize_params, quantize_params

torch = pytest.importorskip("torch")

from tiny import perturb  # noqa: E402

# --- references from the definitions -------------------------------------


def nf4_values_from_normal_quantiles() -> np.ndarray:
    """bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True):
    8 positive and 7 negative N(0, 1) quantiles and 0, scaled to max 1."""
    ppf, offset = NormalDist().inv_cdf, 0.9677083
    pos = [ppf(float(p)) for p in torch.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(float(p)) for p in torch.linspace(offset, 0.5, 8)[:-1]]
    v = torch.tensor(sorted(pos + [0.0] + neg))
    return (v / v.max()).numpy()


def bnb_dynamic_map() -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map(signed=True), verbatim in torch."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data).numpy()


def ref_nearest(x_f32: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table value (first one on a tie), float64 distances."""
    d = np.abs(x_f32[..., None].astype(np.float64) - table.astype(np.float64))
    return np.argmin(d, axis=-1)


def ref_nf4(w: np.ndarray, block: int, axis: int):
    """(packed uint8 codes, float32 absmax) with the blocked axis at `axis`."""
    x = np.moveaxis(w.astype(np.float32), axis, -1)
    pad = -x.shape[-1] % block
    x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], axis=-1)
    blocks = x.reshape(x.shape[:-1] + (-1, block))
    absmax = np.abs(blocks).max(-1)
    normed = blocks / np.where(absmax > 0, absmax, np.float32(1))[..., None]
    idx = ref_nearest(normed, nf4_values_from_normal_quantiles()).reshape(x.shape)
    packed = ((idx[..., 0::2] << 4) | idx[..., 1::2]).astype(np.uint8)
    return np.moveaxis(packed, -1, axis), np.moveaxis(absmax, -1, axis)


def ref_double_quant(absmax: np.ndarray, axis: int, offset: np.float32):
    """(uint8 codes, absmax2) of absmax - offset in 256-blocks of the flattened
    (blocked axis last) array."""
    flat = np.moveaxis(absmax, axis, -1).reshape(-1) - offset
    pad = -flat.size % 256
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, 256)
    absmax2 = np.abs(blocks).max(-1)
    normed = blocks / np.where(absmax2 > 0, absmax2, np.float32(1))[:, None]
    q = ref_nearest(normed, bnb_dynamic_map()).reshape(-1)[:flat.size].astype(np.uint8)
    moved_shape = np.moveaxis(absmax, axis, -1).shape
    return np.moveaxis(q.reshape(moved_shape), -1, axis), absmax2


def weights(shape, seed=0):
    """Gaussian weights with a few large outliers, as trained weights have."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w.flat[rng.choice(w.size, max(1, w.size // 500), replace=False)] *= 20
    return w


# --- code books -----------------------------------------------------------

def test_code_books_are_qlora_and_bitsandbytes():
    np.testing.assert_array_equal(codes.NF4, nf4_values_from_normal_quantiles())
    np.testing.assert_array_equal(codes.DYNAMIC, bnb_dynamic_map())
    assert len(np.unique(codes.DYNAMIC)) == 256 and codes.NF4[7] == 0.0


# --- NF4 and int8 against the references ----------------------------------

# (shape, axis, block): a kernel (in, out) along in, an embedding (v, d)
# along d, a block that does not divide the axis (zero padding), block 32.
NF4_CASES = [((256, 96), 0, 64), ((80, 128), 1, 64), ((100, 48), 0, 64), ((64, 40), 0, 32)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, axis, block", NF4_CASES)
def test_nf4_codes_match_the_reference_exactly(shape, axis, block, double_quant):
    w = weights(shape)
    q = quantize(w, "nf4", axis, block, double_quant)
    packed, absmax = ref_nf4(w, block, axis)
    np.testing.assert_array_equal(np.asarray(q.codes), packed)  # every code, bit for bit
    if not double_quant:
        np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    else:
        # The mean is a float32 sum whose order may differ from numpy's: equal
        # to rounding; the codes are then checked exactly against that offset.
        np.testing.assert_allclose(float(q.offset), absmax.mean(dtype=np.float64), rtol=1e-6)
        dq_codes, absmax2 = ref_double_quant(absmax, axis, np.float32(q.offset))
        np.testing.assert_array_equal(np.asarray(q.absmax), dq_codes)
        np.testing.assert_array_equal(np.asarray(q.absmax2), absmax2)
        # Dequantized absmax: code value * absmax2 + offset (bitsandbytes).
        flat = bnb_dynamic_map()[np.moveaxis(dq_codes, axis, -1).reshape(-1)]
        flat = (np.concatenate([flat, np.zeros(-flat.size % 256, np.float32)]).reshape(-1, 256)
                * absmax2[:, None]).reshape(-1)[:absmax.size]
        absmax = np.moveaxis(flat.reshape(np.moveaxis(absmax, axis, -1).shape), -1,
                             axis) + np.float32(q.offset)
    # Dequantization is code value x block absmax, exactly.
    idx = np.stack([packed >> 4, packed & 15], axis=axis + 1).reshape(
        packed.shape[:axis] + (-1,) + packed.shape[axis + 1:])
    values = nf4_values_from_normal_quantiles()[idx]
    values = np.moveaxis(values, axis, -1)
    values = (values.reshape(values.shape[:-1] + (-1, block))
              * np.moveaxis(absmax, axis, -1)[..., None]).reshape(values.shape)
    expected = np.moveaxis(values[..., :shape[axis]], -1, axis)
    np.testing.assert_allclose(np.asarray(dequantize(q)), expected, rtol=1e-6, atol=0)


# --- against bitsandbytes itself (CPU) ---------------------------------------
#
# bitsandbytes quantizes a PyTorch tensor flattened, in blocks of consecutive
# values: for our weight `w` quantized along `axis`, that is `w` with `axis`
# moved last (a kernel (in, out) along 0 is the torch weight (out, in)). Its
# quantize_4bit on CPU is its portable torch kernel (nearest code by
# bucketize on float32 midpoints, x * (1 / absmax)); its native CPU
# quantize_blockwise (8-bit, used for double quantization) is not exactly
# nearest: in 0.50.2 ~0.15% of values get a farther code (up to 4 codes away
# near 0), so the 8-bit reference is its portable kernel, called directly.

def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_portable_quantize_blockwise(x, code, blocksize):
    """bitsandbytes' portable quantize_blockwise (the CompositeExplicitAutograd
    kernel of torch.ops.bitsandbytes.quantize_blockwise), past its native CPU one."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)


def as_bnb(w, axis):
    """`w` laid out as bitsandbytes blocks it: the blocked axis last, contiguous."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(w, np.float32), axis, -1))


def bnb_order(x, axis):
    """One of our arrays (codes, absmax) flattened in bitsandbytes' order."""
    return np.moveaxis(np.asarray(x), axis, -1).reshape(-1)


def test_code_books_equal_bitsandbytes():
    """Our NF4 and 8-bit dynamic tables are bitsandbytes' own, bit for bit: its
    NF4 table and create_normal_map() (256 values, zero-padded: 16 distinct)."""
    F = bnb_functional()
    np.testing.assert_array_equal(codes.NF4, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(codes.NF4, np.unique(F.create_normal_map().numpy()))
    np.testing.assert_array_equal(codes.DYNAMIC, F.create_dynamic_map(signed=True).numpy())


# (shape, axis, block, dtype): a kernel along in, an embedding along d,
# blocks 128 and 32, a bfloat16 weight (both quantize its float32 values).
BNB_CASES = [((256, 96), 0, 64, "float32"), ((96, 128), 1, 64, "float32"),
             ((512, 64), 0, 128, "float32"), ((128, 64), 0, 32, "float32"),
             ((256, 96), 0, 64, "bfloat16")]


@pytest.mark.parametrize("shape, axis, block, dtype", BNB_CASES)
def test_nf4_equals_bitsandbytes(shape, axis, block, dtype):
    """bitsandbytes.functional.quantize_4bit(quant_type="nf4",
    compress_statistics=False) and dequantize_4bit: the packed codes (nibble
    order included), the absmax values and the dequantized weights are equal
    bit for bit. Exact because both divide by the same float32 absmax and round
    to the nearest code; they could differ only for a value within an ulp of a
    decision boundary (bitsandbytes multiplies by 1 / absmax), which these
    seeded weights do not have. Mutation controls: swapped nibbles and
    round-down codes must not be equal."""
    F = bnb_functional()
    w = weights(shape).astype(jnp.dtype(dtype))
    t = torch.tensor(as_bnb(w, axis)).to(getattr(torch, dtype))
    packed, state = F.quantize_4bit(t, blocksize=block, quant_type="nf4",
                                    compress_statistics=False)
    q = quantize(jnp.asarray(w), "nf4", axis, block, double_quant=False)
    ours = bnb_order(q.codes, axis)
    np.testing.assert_array_equal(ours, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(bnb_order(q.absmax, axis), state.absmax.numpy())
    deq = F.dequantize_4bit(packed, state).float().numpy()
    np.testing.assert_array_equal(as_bnb(np.asarray(dequantize(q).astype(jnp.float32)), axis),
                                  deq)

    assert not np.array_equal((ours << 4) | (ours >> 4), packed.numpy().reshape(-1))
    normed = as_bnb(w, axis).reshape(-1, block) / state.absmax.numpy()[:, None]
    floor = np.searchsorted(codes.NF4, normed.reshape(-1), side="right") - 1
    assert not np.array_equal((floor[0::2] << 4) | floor[1::2], packed.numpy().reshape(-1))


@pytest.mark.parametrize("shape, axis, block, dtype", BNB_CASES[:3])
def test_nf4_double_quant_equals_bitsandbytes(shape, axis, block, dtype):
    """quantize_4bit(compress_statistics=True): the 4-bit codes bit for bit;
    the offset (mean of the absmax values) and absmax2 to 1e-6 (float32 sums
    in another order); the 8-bit codes of absmax - offset and their absmax2
    exactly equal to bitsandbytes' portable quantize_blockwise (code =
    create_dynamic_map(signed=True), blocks of 256); the dequantized weights
    (bitsandbytes' dequantize_4bit with those statistics) to 1e-6 relative.
    Mutation control: round-down 8-bit codes must not be equal."""
    F = bnb_functional()
    w = weights(shape)
    t = torch.tensor(as_bnb(w, axis))
    packed, state = F.quantize_4bit(t, blocksize=block, quant_type="nf4",
                                    compress_statistics=True)
    absmax = F.quantize_4bit(t, blocksize=block, quant_type="nf4")[1].absmax
    q = quantize(w, "nf4", axis, block, double_quant=True)
    np.testing.assert_array_equal(bnb_order(q.codes, axis), packed.numpy().reshape(-1))
    np.testing.assert_allclose(float(q.offset), state.offset.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.absmax2), state.state2.absmax.numpy(), rtol=1e-6)

    dynamic = F.create_dynamic_map(signed=True)
    ref8, ref_absmax2 = bnb_portable_quantize_blockwise(absmax - float(q.offset), dynamic, 256)
    np.testing.assert_array_equal(bnb_order(q.absmax, axis), ref8.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax2), ref_absmax2.numpy())
    state.absmax, state.state2.absmax = ref8, ref_absmax2
    state.offset = torch.tensor(float(q.offset))
    np.testing.assert_allclose(as_bnb(dequantize(q), axis),
                               F.dequantize_4bit(packed, state).numpy(), rtol=1e-6, atol=0)

    normed = (absmax - float(q.offset)).numpy()
    normed = np.pad(normed, (0, -normed.size % 256)).reshape(-1, 256) / ref_absmax2.numpy()[:, None]
    floor = np.searchsorted(codes.DYNAMIC, normed.reshape(-1)[:absmax.numel()], side="right") - 1
    assert not np.array_equal(floor, ref8.numpy())


def test_int8_equals_bitsandbytes_vectorwise():
    """Our int8 is LLM.int8()'s weight quantization: one absmax per output
    channel, codes round(w * 127 / absmax). bitsandbytes'
    int8_vectorwise_quant (threshold 0) on the torch weight (out, in), row by
    row: codes and absmax equal exactly (we divide by absmax / 127, it
    multiplies by 127 / absmax: they could differ only on a value within an
    ulp of a .5, which these weights do not have); int8_vectorwise_dequant to
    1e-6 relative (it multiplies by a rounded 1/127). Mutation control:
    truncated codes must not be equal."""
    F = bnb_functional()
    w = weights((300, 70), seed=1)  # no all-zero channel: bitsandbytes divides by 0 there
    q = quantize(w, "int8", axis=0)
    rows, row_absmax, _ = F.int8_vectorwise_quant(torch.tensor(as_bnb(w, 0)))
    np.testing.assert_array_equal(np.asarray(q.codes).T, rows.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax)[0], row_absmax.numpy())
    np.testing.assert_allclose(np.asarray(dequantize(q)).T,
                               F.int8_vectorwise_dequant(rows, row_absmax).numpy(), rtol=1e-6)
    truncated = np.trunc(w / (np.abs(w).max(0) / 127)).astype(np.int8)
    assert not np.array_equal(truncated.T, rows.numpy())


def test_nf4_error_is_within_half_a_code_gap():
    w = weights((512, 64), seed=3)
    q = quantize(w, "nf4", 0, 64, double_quant=False)
    err = np.abs(np.asarray(dequantize(q)) - w).reshape(8, 64, 64)
    half_gap = np.diff(codes.NF4).max() / 2  # 0.16: between 0.72 and 1.0
    bound = half_gap * np.asarray(q.absmax)[:, None, :] * (1 + 1e-6)
    assert np.all(err <= bound)


def test_int8_round_trip_error_bounds():
    w = weights((300, 70), seed=1)
    w[:, 5] = 0.0  # an all-zero channel
    q = quantize(w, "int8", axis=0)
    assert q.codes.dtype == jnp.int8 and q.absmax.shape == (1, 70)
    deq = np.asarray(dequantize(q))
    absmax = np.abs(w).max(0)
    # Rounding to a step of absmax / 127: at most half a step, plus float32 rounding.
    step = absmax / 127
    assert np.all(np.abs(deq - w) <= step / 2 * (1 + 1e-5) + 1e-9)
    np.testing.assert_array_equal(deq[:, 5], 0.0)
    codes_ = np.asarray(q.codes)
    assert np.abs(codes_).max() == 127 and np.all(np.abs(codes_).max(0)[absmax > 0] == 127)
    # Round to nearest leaves uniform noise of RMS step / sqrt(12) (truncation would double it).
    rms, uniform = np.sqrt(np.mean((deq - w) ** 2)), np.sqrt(np.mean(step ** 2) / 12)
    print(f"int8 RMS error {rms:.3e}, uniform-rounding prediction {uniform:.3e}")
    assert 0.8 * uniform < rms < 1.2 * uniform


def test_an_all_zero_block_dequantizes_to_zero():
    w = np.zeros((128, 4), np.float32)
    w[64:, 1] = 1.0
    for kind in ("nf4", "int8"):
        deq = np.asarray(dequantize(quantize(w, kind)))
        np.testing.assert_array_equal(deq, w)


# --- layout, bytes, shapes --------------------------------------------------

def tiny_cfg(**kw):
    return LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5), **kw})


def expected_nf4_bytes(shape, axis, block=64, double=True) -> int:
    n, other = shape[axis], int(np.prod(shape)) // shape[axis]
    nb = -(-n // block)
    total = nb * block // 2 * other  # packed codes
    if double:
        return total + nb * other + -(-nb * other // 256) * 4 + 4
    return total + nb * other * 4


def test_stored_tree_layout_and_exact_bytes_of_a_7b_model():
    """LLaMA-7B through eval_shape: no memory. Every kernel along its input
    axis, the embedding along d, the head along d; norms stay float32."""
    abstract = abstract_params(LLAMA_7B)
    q = jax.eval_shape(lambda p: quantize_params(p, QuantConfig("nf4")), abstract)
    qk = q["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(qk, QuantizedArray) and qk.shape == (4096, 4096) and qk.axis == 0
    assert (qk.codes.shape, qk.codes.dtype) == ((2048, 4096), jnp.uint8)
    assert (qk.absmax.shape, qk.absmax.dtype) == ((64, 4096), jnp.uint8)
    assert qk.absmax2.shape == (1024,) and qk.offset.shape == ()
    assert q["embed_tokens"].codes.shape == (32000, 2048) and q["embed_tokens"].axis == 1
    assert q["lm_head"].codes.shape == (2048, 32000) and q["lm_head"].axis == 0
    assert not isinstance(q["norm"]["scale"], QuantizedArray)
    expected = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = path[-1].key
        axis = {"kernel": 0, "embed_tokens": 1, "lm_head": 0}.get(name)
        expected += 4 * leaf.size if axis is None else expected_nf4_bytes(leaf.shape, axis)
    assert stored_bytes(q) == expected
    n = fa.num_params(q)
    assert n == fa.num_params(abstract) == 6_738_415_616  # logical values, not bytes
    ratio = stored_bytes(q) / (2 * n)
    print(f"LLaMA-7B NF4 (double quant): {stored_bytes(q) / 2**30:.2f} GiB = {ratio:.1%} of bf16")
    assert ratio < 0.27
    q8 = jax.eval_shape(lambda p: quantize_params(p, QuantConfig("int8")), abstract)
    assert q8["layers_0"]["mlp"]["down_proj"]["kernel"].absmax.shape == (1, 4096)


def test_a_quantized_tree_survives_orbax(tmp_path):
    import orbax.checkpoint as ocp

    params = random_params(tiny_cfg())
    q = quantize_params(params, QuantConfig("nf4"))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "q", q)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "q", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, q))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(q)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, q)


# --- the model on a quantized base ------------------------------------------

@functools.lru_cache
def random_params(cfg, seed=0, scale=3.0):
    """Random base weights, larger than init's 0.02 so the logits move."""
    @jax.jit
    def make():
        p = nn.unbox(LlamaForCausalLM(cfg).init(jax.random.key(seed),
                                                jnp.zeros((1, 4), jnp.int32)))["params"]
        leaves, treedef = jax.tree_util.tree_flatten(p)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        out = [x * scale if x.ndim == 2 else x + 0.1 * jax.random.normal(k, x.shape)
               for x, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(treedef, out)
    return make()


def batch(vocab):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (3, 12))
    valid = np.ones((3, 12), bool)
    valid[1, :4] = False
    return jnp.asarray(tokens), jnp.asarray(valid)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, valid):
    return model.apply({"params": fa.materialize(params)}, tokens, valid)[0]


def logits(cfg, params, settings=None, dtype=jnp.float32):
    tokens, valid = batch(cfg.vocab_size)
    settings = settings or fa.settings_for(None, cfg.model_type)
    model = LlamaForCausalLM(cfg, dtype=dtype, settings=settings)
    return np.asarray(_apply(model, params, tokens, valid))[np.asarray(valid)]


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


# Tolerance. NF4 (block 64) leaves a relative RMS weight error of ~9% on
# these Gaussian weights, per-channel int8 ~0.6%. Independent errors in the
# embedding, the 2 x 7 kernels and the head add up through the network: the
# logits' relative RMS error measured 2.7-2.9x the weight error for both
# kinds, so we allow 4x (NF4 ~0.37, int8 ~0.024). Against the float model run
# on the dequantized weights the quantized model agrees to float32 rounding:
# the exact check that the packed weights are dequantized right in the jit.
def weight_error(params, q) -> float:
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(dequantize_params(q)))
        if a.ndim == 2]
    return float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in pairs)
                         / sum((a ** 2).sum() for a, _ in pairs)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_logits_close_to_float(kind, tied):
    cfg = tiny_cfg(tie_word_embeddings=tied)
    params = random_params(cfg)
    q = quantize_params(params, QuantConfig(kind))
    err, err_w = rel_rms(logits(cfg, q), logits(cfg, params)), weight_error(params, q)
    print(f"{kind} tied={tied}: relative RMS error of the weights {err_w:.4f}, "
          f"of the logits {err:.4f}")
    assert err_w < {"nf4": 0.1, "int8": 0.007}[kind]
    assert err < 4 * err_w
    out = logits(cfg, q)
    np.testing.assert_allclose(out, logits(cfg, dequantize_params(q)), rtol=1e-5, atol=1e-5)
    # bfloat16 compute: the dequantized weights are cast to it, as a bf16 base is.
    out16 = logits(cfg, q, dtype=jnp.bfloat16)
    ref16 = logits(cfg, dequantize_params(q, jnp.bfloat16), dtype=jnp.bfloat16)
    np.testing.assert_allclose(out16, ref16, rtol=1e-2, atol=1e-2)


METHODS = {
    "lora": fa.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "dora": fa.LoraConfig(r=4, alpha=8, use_dora=True, target_modules="all-linear"),
    "ia3": fa.IA3Config(),
    "parallel": fa.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True),
    "prefix": fa.PrefixConfig(num_virtual_tokens=3),
    "prompt": fa.PromptTuningConfig(num_virtual_tokens=3, init="sample_vocab"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_adapter_on_a_quantized_base_equals_it_on_the_dequantized_base(method):
    """The adapter's init (DoRA's magnitudes from the dequantized columns,
    prompts from the dequantized embeddings), forward and gradients read the
    quantized weights exactly as the float weights they stand for."""
    cfg, acfg = tiny_cfg(), METHODS[method]
    q = quantize_params(random_params(cfg), QuantConfig("nf4", block_size=16))
    f = dequantize_params(q)
    mt = cfg.model_type
    tq = perturb(fa.inject(q, acfg, jax.random.key(0), mt))
    tf = fa.inject(f, acfg, jax.random.key(0), mt)
    chex.assert_trees_all_close(fa.split(fa.inject(q, acfg, jax.random.key(0), mt)).trainable,
                                fa.split(tf).trainable, rtol=1e-6, atol=1e-6)
    tf = fa.combine(fa.split(tf).frozen, fa.split(tq).trainable)
    settings = fa.settings_for(acfg, mt)
    out_q, out_f = logits(cfg, tq, settings), logits(cfg, tf, settings)
    assert rel_rms(out_q, logits(cfg, q)) > 1e-2  # the adapter does something
    np.testing.assert_allclose(out_q, out_f, rtol=1e-5, atol=1e-5)

    tokens, valid = batch(cfg.vocab_size)
    model = LlamaForCausalLM(cfg, settings=settings)

    def loss(trainable, frozen):
        out, _ = model.apply({"params": fa.materialize(fa.combine(frozen, trainable))},
                             tokens, valid)
        return jnp.mean(jax.nn.log_softmax(out)[..., 0])

    g_q = jax.jit(jax.grad(loss))(fa.split(tq).trainable, fa.split(tq).frozen)
    g_f = jax.jit(jax.grad(loss))(fa.split(tq).trainable, fa.split(tf).frozen)
    chex.assert_trees_all_close(g_q, g_f, rtol=1e-4, atol=1e-6)


def test_generation_on_a_quantized_base():
    cfg = tiny_cfg(eos_token_id=None)
    q = quantize_params(random_params(cfg), QuantConfig("nf4"))
    model = LlamaForCausalLM(cfg)
    prompts = [[5, 9, 2, 44], [7, 1]]
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    np.testing.assert_array_equal(generate(model, q, prompts, gen),
                                  generate(model, dequantize_params(q), prompts, gen))


def test_sharded_quantized_forward_equals_one_device():
    """8 fake devices, data=2 x fsdp=2 x tensor=2: the packed codes and
    absmax shard like their float kernels (block 16 gives several blocks per
    kernel column, so the absmax rows shard over fsdp too)."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them up")
    cfg = tiny_cfg()
    t = perturb(fa.inject(quantize_params(random_params(cfg), QuantConfig("nf4", block_size=16)),
                          METHODS["lora"], jax.random.key(0), cfg.model_type))
    settings = fa.settings_for(METHODS["lora"], cfg.model_type)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), devices[:8])
    names = axes.adapter_axes(t, logical_axes(cfg))
    shardings = sharding.tree_shardings(names, t, mesh)
    kernel_sh = shardings["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel_sh.codes.spec == kernel_sh.absmax.spec == P("fsdp", "tensor")
    placed = jax.device_put(t, shardings)
    tokens, valid = batch(cfg.vocab_size)
    tokens = jnp.concatenate([tokens, tokens[:1]])  # batch 4: divisible by data x fsdp
    valid = jnp.concatenate([valid, valid[:1]])
    model = LlamaForCausalLM(cfg, settings=settings)
    fwd = jax.jit(lambda p, x, v: model.apply({"params": p}, x, v)[0],
                  in_shardings=(shardings, sharding.batch_sharding(mesh),
                                sharding.batch_sharding(mesh)))
    one = jax.jit(lambda p, x, v: model.apply({"params": p}, x, v)[0])
    out8 = fwd(placed, tokens, valid)
    out1 = one(jax.device_put(t, devices[0]), tokens, valid)
    # Only the order of float32 reductions differs between the two.
    np.testing.assert_allclose(np.asarray(out8), np.asarray(out1), rtol=1e-5, atol=1e-5)


def test_take_dequantizes_only_the_rows():
    table = weights((50, 40), seed=4)
    q = quantize(table, "nf4", axis=1, block_size=16)
    ids = jnp.asarray([[3, 49], [0, 3]])
    np.testing.assert_array_equal(np.asarray(take(q, ids, jnp.float32)),
                                  np.asarray(dequantize(q))[np.asarray(ids)])


# --- merge and bad input -------------------------------------------------------

def test_merge_into_a_quantized_base_is_refused_and_dequantize_then_merge_works():
    cfg, acfg = tiny_cfg(), METHODS["lora"]
    t = perturb(fa.inject(quantize_params(random_params(cfg), QuantConfig("nf4")), acfg,
                          jax.random.key(0), cfg.model_type))
    with pytest.raises(ValueError, match="quantized base.*dequantize_params"):
        fa.merge(t, acfg)
    merged = fa.merge(dequantize_params(t), acfg)
    settings = fa.settings_for(acfg, cfg.model_type)
    np.testing.assert_allclose(logits(cfg, merged), logits(cfg, t, settings),
                               rtol=1e-4, atol=1e-4)


def test_bad_quantization_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown quantization 'nf3'"):
        QuantConfig("nf3")
    with pytest.raises(ValueError, match="block_size must be even"):
        QuantConfig("nf4", block_size=63)
    cfg = tiny_cfg()
    q = quantize_params(random_params(cfg), QuantConfig("int8"))
    with pytest.raises(ValueError, match="full fine-tuning trains every weight.*quantize=none"):
        fa.inject(q, fa.FullConfig(), jax.random.key(0), cfg.model_type)
    with pytest.raises(ValueError, match="modules_to_save selects lm_head, which is quantized"):
        fa.inject(q, fa.LoraConfig(r=2, modules_to_save=("lm_head",)), jax.random.key(0),
                  cfg.model_type)
    kept = quantize_params(random_params(cfg), QuantConfig("nf4", skip=("lm_head", "norm"),
                                                           model_type=cfg.model_type))
    assert not isinstance(kept["lm_head"], QuantizedArray)
    assert isinstance(kept["embed_tokens"], QuantizedArray)
    wrong = dataclasses.replace(kept["embed_tokens"], shape=(129, 64))
    with pytest.raises(ValueError, match="quantized weight has shape"):
        logits(cfg, {**kept, "embed_tokens": wrong})


# --- training on a quantized base ------------------------------------------------

def test_lora_training_on_a_quantized_base(tmp_path):
    """`python -m train model.quantize=nf4`'s setup and step: the loss on a batch falls,
    the packed base is bit-identical afterwards, and 8 devices (data x fsdp x
    tensor) give the losses of 1."""
    from tiny import make_model_dir
    from train import config as config_lib
    from flax_adapters.sharding import global_batch
    from train.loop import build, compile_steps

    model_dir = make_model_dir(tmp_path / "model")

    def losses_and_setup(n_devices, *mesh):
        cfg = config_lib.load(None, [
            f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}", "model.quantize=nf4",
            "steps=10", "batch_size=8", "micro_batch_size=8", "eval_generate=0",
            "optim.lr=3e-3", "optim.warmup_steps=1", "optim.schedule=constant",
            "data.train_on_inputs=true",
            "data.embedded_train_size=64",
            "data.val_set_size=8", "adapter.settings.r=4", *mesh])
        s = build(cfg, jax.devices()[:n_devices])
        step_fn, _, batch_sh = compile_steps(s, cfg)
        state, out = s.state, []
        for _ in range(cfg.steps):  # one batch, over and over: it must be learnt
            state, metrics = step_fn(state, s.frozen, global_batch(
                s.prepared.train.batch_at(0), 1, batch_sh), jax.random.key(0))
            out.append(float(metrics["loss"]))
        return out, s

    losses, s = losses_and_setup(1, "mesh.data=1")
    print("losses on an NF4 base:", [f"{x:.3f}" for x in losses])
    # Step 1 is warmup (lr 0); from there on every step lowers the loss on the batch.
    assert all(b < a for a, b in zip(losses[1:], losses[2:])) and losses[-1] < losses[0] - 0.1
    kernel = s.frozen["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, QuantizedArray) and kernel.shape == (32, 32)
    fresh = load_pretrained_quantized(model_dir)
    assert jax.tree_util.tree_structure(s.frozen) == jax.tree_util.tree_structure(fresh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, s.frozen, fresh)  # bit-identical
    losses8, _ = losses_and_setup(8, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    np.testing.assert_allclose(losses8, losses, rtol=1e-5, atol=1e-5)  # reduction order only


def load_pretrained_quantized(path):
    from flax_adapters.checkpoints import load_pretrained

    return load_pretrained(path, quantize="nf4").params


@pytest.mark.parametrize("kind, axis", [("nf4", 0), ("nf4", 1), ("int8", 0), ("int8", 1)])
def test_quantizing_in_slices_equals_quantizing_whole(monkeypatch, kind, axis):
    """Large weights are quantized in slices along the other axis (bounded
    temporaries); the result must be the very same arrays."""
    from flax_adapters.quant import array

    w = weights((96, 80), seed=5)
    whole = quantize(w, kind, axis, 16)
    monkeypatch.setattr(array, "CHUNK", 700)  # 96 x 80 in slices of 8 or 7 rows/columns
    sliced = quantize(w, kind, axis, 16)
    assert jax.tree_util.tree_structure(sliced) == jax.tree_util.tree_structure(whole)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sliced, whole)


@pytest.mark.slow
def test_smollm2_quantized_at_load():
    """The real model: NF4 within the memory goal (<= 30% of bfloat16), and
    its next-token predictions on a real paragraph. Measured: float32 NLL
    1.917 nats/token; int8 1.900 (96% of the top-1 predictions unchanged);
    NF4 2.433 (67% unchanged) -- a 135M model loses about half a nat at 4 bits
    (its weights come from a Q4_1 file, so NF4 rounds them a second time).
    Bounds: int8 within 0.05 nats and 90%, NF4 within 0.75 nats and 60%."""
    from flax_adapters.checkpoints import default_model_path, load_pretrained

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
            "France. It is named after the engineer Gustave Eiffel, whose company designed and "
            "built the tower. Locally nicknamed the Iron Lady, it was constructed from 1887 to "
            "1889 as the centerpiece of the 1889 World's Fair.")
    pre = load_pretrained(path)
    ids = jnp.asarray([pre.tokenizer(text)["input_ids"]])
    model = LlamaForCausalLM(pre.config)
    fwd = jax.jit(lambda p: model.apply({"params": p}, ids)[0][0, :-1])

    def nll(lg):
        return float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), ids[0, 1:, None], 1)))

    ref = fwd(pre.params)
    bf16_bytes = 2 * fa.num_params(pre.params)
    bounds = {"int8": (0.05, 0.9, 0.51), "nf4": (0.75, 0.6, 0.30)}
    for kind, (dnll, agree, memory) in bounds.items():
        q = load_pretrained(path, quantize=kind).params
        out = fwd(q)
        same = float(jnp.mean(out.argmax(-1) == ref.argmax(-1)))
        ratio = stored_bytes(q) / bf16_bytes
        print(f"{kind}: {stored_bytes(q) / 1e6:.1f} MB = {ratio:.1%} of bfloat16; NLL "
              f"{nll(out):.3f} vs {nll(ref):.3f}; top-1 unchanged {same:.0%}")
        assert ratio <= memory and abs(nll(out) - nll(ref)) < dnll and same >= agree


@pytest.mark.parametrize("name", ["bloom", "opt_350m_style", "gptj", "gpt_neox",
                                  "phi3"])
def test_every_family_runs_on_a_quantized_base(name):
    """Kernels, the embedding table and the head quantized (NF4) in every family:
    the logits are those of the same model on the dequantized weights, so each
    family reads every quantized leaf through quant/array.py."""
    from families import hf_config

    from flax_adapters.models import config_from_hf, model_class

    cfg = config_from_hf(hf_config(name).to_dict())
    model = model_class(cfg)(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    q = quantize_params(nn.unbox(params), QuantConfig("nf4", block_size=16))
    assert isinstance(q["embed_tokens"], QuantizedArray)
    tokens, valid = batch(cfg.vocab_size)
    out = np.asarray(_apply(model, q, tokens, valid))
    ref = np.asarray(_apply(model, dequantize_params(q), tokens, valid))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
