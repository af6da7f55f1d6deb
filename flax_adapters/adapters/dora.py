"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024,
arXiv:2402.09353), exactly as PEFT 0.21 computes it (`LoraConfig(use_dora=True)`;
peft/tuners/lora/dora.py `DoraLinearLayer` and variants.py `DoraLinearVariant`).
It is a variant of LoRA (lora.py registers both, as PEFT's one config does);
this file holds the maths that differs.

At each targeted linear site (kernel W of shape (in, out)) LoRA's leaves plus
a magnitude per output column:

    before: {'kernel': W}
    after:  {'kernel': W, 'lora_a': A (in, r), 'lora_b': B (r, out),
             'lora_magnitude': m (out,)}            # PEFT: lora_magnitude_vector

    n   = ||W + s A B||_col   (out,), a constant: no gradient flows through it
    y   = x W + b + (m / n - 1) * (x' W) + (m / n) * s (x' A) B,   x' = dropout(x)

With no dropout (or at eval) x' = x and this is b + (m / n)(x W + s x A B),
the paper's W' = m (W + s A B) / n. Under dropout PEFT feeds x' to both the
low-rank path and the re-scaled base path (the un-dropped x W stays), and we
do the same. `n` is detached because the paper (sec. 4.3) and PEFT treat it
as a constant. m is initialised to n (so m / n = 1 and a fresh adapter with
B = 0 leaves outputs unchanged; with a non-zero B it is PEFT's init too).

The site never forms the (in, out) matrix W + s A B; the column norms follow
from small products (exact algebra, (out, r) and (r, r) intermediates):

    n_j^2 = ||W_j||^2 + 2 s sum_r (W^T A)_{jr} B_{rj} + s^2 B_j^T (A^T A) B_j

`merge` does form it, as PEFT: W' = (m / n) (W + s A B) column-wise. The
merged columns have norm |m| whatever n was, so n cannot be recovered from
W'; `unmerge` needs the norms from before the merge (`weight_norms`), just
as PEFT keeps them in a cache between its merge and unmerge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_adapters.quant import array as qarray
from flax_adapters.tree import combine, get, nest, sites_with, with_site


def column_norm(w_io: jax.Array, a_ir: jax.Array, b_ro: jax.Array, scale: float) -> jax.Array:
    """||W + scale A B|| per output column, (out,) float32, without the (in, out)
    sum. A quantized W is dequantized (as PEFT does for a bitsandbytes base)."""
    w, a, b = (qarray.as_float(x, jnp.float32) for x in (w_io, a_ir, b_ro))
    ww_o = jnp.einsum("io,io->o", w, w)
    wab_o = jnp.einsum("or,ro->o", jnp.einsum("io,ir->or", w, a), b)
    bab_o = jnp.einsum("ro,rs,so->o", b, jnp.einsum("ir,is->rs", a, a), b)
    # Rounding can push an exactly-zero column a hair below 0; sqrt would NaN.
    return jnp.sqrt(jnp.maximum(ww_o + 2 * scale * wab_o + scale**2 * bab_o, 0.0))


def add_magnitudes(tree: dict, scale: float) -> dict:
    """`lora_magnitude` = the column norms of W + s A B beside every LoRA."""
    for site in sites_with(tree, "lora_a"):
        tree = with_site(tree, site, lambda m: {**m, "lora_magnitude": column_norm(
            m["kernel"], m["lora_a"], m["lora_b"], scale)})
    return tree


def weight_norms(tree: dict, scale: float) -> dict:
    """The norms n that `merge` divides by, for `unmerge`:
    {'layers_0': {'self_attn': {'q_proj': {'weight_norm': n (out,)}}}, ...}."""
    out: dict = {}
    for site in sites_with(tree, "lora_a"):
        m = get(tree, site)
        out = combine(out, nest(site, {"weight_norm": column_norm(
            m["kernel"], m["lora_a"], m["lora_b"], scale)}))
    return out


def merge(tree: dict, scale: float) -> dict:
    """W' = (m / n) * (W + s A B) per output column; a plain base tree."""
    def fold(mod):
        w = mod["kernel"]
        v = w.astype(jnp.float32) + scale * (mod["lora_a"] @ mod["lora_b"])
        n = jnp.linalg.norm(v, axis=0)
        rest = {k: x for k, x in mod.items() if k not in ("lora_a", "lora_b", "lora_magnitude")}
        return {**rest, "kernel": (v * (mod["lora_magnitude"] / n)).astype(w.dtype)}
    for site in sites_with(tree, "lora_a"):
        tree = with_site(tree, site, fold)
    return tree


def unmerge(merged: dict, adapter: dict, scale: float, norms: dict | None) -> dict:
    """Inverse of `merge`: W = W' n / m - s A B, the adapter leaves put back
    (`adapter`: the adapter's leaves only).

        norms = weight_norms(tree, scale)        # before merging
        unmerge(merge(tree, scale), trainable, scale, norms) == tree  (to rounding)
    """
    if norms is None:
        raise ValueError("unmerging DoRA needs the column norms from before the merge (the "
                         "merged weight no longer determines them): pass "
                         "dora_norms=fa.api.dora_norms(tree, cfg), computed before the merge")

    def unfold(mod, x, n):
        w = mod["kernel"]
        v = w.astype(jnp.float32) * (n / x["lora_magnitude"])
        return {**mod, "kernel": (v - scale * (x["lora_a"] @ x["lora_b"])).astype(w.dtype)}
    for site in sites_with(adapter, "lora_a"):
        n = get(norms, site)["weight_norm"]
        merged = with_site(merged, site, lambda mod, x=get(adapter, site), n=n: unfold(mod, x, n))
    return combine(merged, adapter)
