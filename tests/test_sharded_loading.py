"""Loading straight into the mesh: each device gets only its slice of each
weight, read from the memory-mapped safetensors file, quantized per shard,
and the values are bit for bit those of the unsharded load.

The structural check ("no device ever holds a whole tensor that its sharding
splits") scans every live jax array while the base is built, leaf by leaf,
for a device buffer with the whole shape of a split leaf; it finds them on
the unsharded path (load on device 0, then device_put), which is what
train/loop.py did before, so the check has teeth.
"""

import gc
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from flax_adapters import sharding
from flax_adapters.checkpoints import hf, load_pretrained
from flax_adapters.checkpoints.safetensors_io import iter_tensors
from flax_adapters.quant.array import is_quantized
from flax_adapters.quant.params import QuantConfig
from tiny import make_model_dir

MESHES = [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # hidden 32, MLP 64, 4 heads / 2 kv heads: kernels smaller than one NF4
    # block of 64 (padding) and one block exactly, split 2 and 4 ways.
    return make_model_dir(tmp_path_factory.mktemp("llama"))


def children(tree):
    """(path, array) of every array, a quantized leaf's children included."""
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def split_shapes(tree) -> set:
    """(shape, dtype) of every array of `tree` that its sharding splits."""
    return {(x.shape, x.dtype) for _, x in children(tree)
            if x.sharding.shard_shape(x.shape) != x.shape}


def whole_buffers(shapes: set, ignore: list) -> list:
    """Device buffers of live arrays (outside `ignore`) that hold a whole
    array of one of `shapes` (a shard of a split array is not whole, even
    where its shape happens to be another leaf's)."""
    skip = {id(x) for x in ignore}
    return [(s.device, x.shape) for x in jax.live_arrays()
            if id(x) not in skip and (x.shape, x.dtype) in shapes
            for s in x.addressable_shards if s.data.shape == x.shape]


def sharded_load(directory, mesh, dtype=np.float32, quantize=None, on_leaf=None):
    """hf.load_hf_dir(directory, mesh=mesh), calling `on_leaf()` before each leaf."""
    cfg = hf.config_from_hf(json.loads((directory / "config.json").read_text()), "config.json")
    place = hf.mesh_placement(cfg, mesh)

    def spied(path, abstract):
        if on_leaf is not None:
            on_leaf()
        return place(path, abstract)
    tensors = (t for f in hf.weight_files(directory) for t in iter_tensors(f))
    return hf.hf_state_to_params(cfg, tensors, dtype, quantize, spied)


QUANT = [None, QuantConfig("nf4"), QuantConfig("nf4", double_quant=False), QuantConfig("int8")]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "x".join(map(str, m.values())))
@pytest.mark.parametrize("quantize", QUANT, ids=["float", "nf4", "nf4_nodq", "int8"])
def test_each_device_holds_only_its_slice_and_values_are_unchanged(model_dir, mesh_cfg,
                                                                   quantize):
    mesh = sharding.make_mesh(sharding.MeshConfig(**mesh_cfg))
    gc.collect()
    before = jax.live_arrays()
    # The whole shapes of the split leaves, planned without loading anything.
    planned = {}

    def on_leaf():
        found = whole_buffers(set(planned), before)
        assert not found, f"whole tensors on one device while loading: {found[:3]}"
    params = sharded_load(model_dir, mesh, quantize=quantize, on_leaf=on_leaf)
    planned.update(dict.fromkeys(split_shapes(params)))
    assert planned, "the mesh splits nothing: the test would prove nothing"
    on_leaf()

    want_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)
    for name, x in children(params):
        # Every addressable shard is exactly its slice, on its own device.
        assert {s.data.shape for s in x.addressable_shards} == {x.sharding.shard_shape(x.shape)}
        assert sorted(s.device.id for s in x.addressable_shards) == list(range(8)), name

    reference = load_pretrained(model_dir, quantize=quantize).params  # today's path: device 0
    assert jax.tree_util.tree_structure(reference) == jax.tree_util.tree_structure(params)
    for (name, got), (_, want) in zip(children(params), children(reference)):
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    # The same shardings as train/loop.py's frozen base (the check that
    # device_put there is a no-op).
    placed = jax.device_put(reference, want_sh)
    assert jax.tree_util.tree_map(lambda x: x.sharding, placed) == want_sh
    # ...and the check above fails on the unsharded path: the reference
    # holds every split leaf whole on device 0.
    assert whole_buffers(set(planned), before + [x for _, x in children(params)])


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_bfloat16_and_load_pretrained_mesh(model_dir, quantize):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    got = load_pretrained(model_dir, "bfloat16", quantize, mesh=mesh).params
    want = load_pretrained(model_dir, "bfloat16", quantize).params
    for (name, a), (_, b) in zip(children(got), children(want)):
        assert a.dtype == b.dtype and a.sharding.mesh == mesh, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert any(is_quantized(x) for x in jax.tree_util.tree_leaves(got, is_leaf=is_quantized)) \
        == (quantize is not None)


def test_a_nan_is_found_in_a_shard(tmp_path):
    from test_loading import write_tiny
    d = write_tiny(tmp_path / "m", extra={"model.norm.weight": np.full(16, np.nan, np.float32)})
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    with pytest.raises(ValueError, match="'model.norm.weight' contains NaN"):
        load_pretrained(d, mesh=mesh)


# Peak host RSS of a load in a fresh process (8 fake CPU devices: device
# buffers are host memory too). Printed, not asserted: a measurement.
RSS_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    import numpy as np
    from flax_adapters import sharding
    from flax_adapters.checkpoints import load_pretrained
    path, mode, quantize = sys.argv[1], sys.argv[2], sys.argv[3]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    pre = load_pretrained(path, quantize=None if quantize == "none" else quantize,
                          mesh=mesh if mode == "sharded" else None)
    if mode == "device_put":  # today's train path: load, then lay out on the mesh
        from flax_adapters.checkpoints.hf import mesh_placement
        import jax
        place = mesh_placement(pre.config, mesh)
        flat = {tuple(k.key for k in p): x for p, x in
                jax.tree_util.tree_flatten_with_path(pre.params, is_leaf=lambda x: not
                isinstance(x, dict))[0]}
        placed = {p: jax.device_put(x, place(p, jax.eval_shape(lambda: x)))
                  for p, x in flat.items()}
        del pre
    status = pathlib.Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"mode": mode, "quantize": quantize, "peak_rss_mib": hwm / 1024}))
""")


def write_llama(directory, hidden=512, mlp=1536, layers=4, vocab=8192):
    """A LLaMA-shaped model of ~20M float32 weights (80 MB), written with our writer."""
    from flax_adapters.checkpoints.safetensors_io import save_file
    from flax_adapters.models.names import path_to_hf_name
    from flax_adapters.models.registry import abstract_params
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 4}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            abstract_params(hf.config_from_hf(config, "config")))[0]:
        keys = tuple(k.key for k in path)
        shape = leaf.shape[::-1] if keys[-1] in ("kernel", "lm_head") else leaf.shape
        state[path_to_hf_name(keys, "llama")] = rng.standard_normal(shape, np.float32) * 0.02
    save_file(state, directory / "model.safetensors")
    return directory


def test_peak_host_rss_is_measured(tmp_path):
    d = write_llama(tmp_path / "llama")
    rows = []
    for quantize in ("none", "nf4"):
        for mode in ("default_device", "device_put", "sharded"):
            out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(d), mode, quantize],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    size_mib = (d / "model.safetensors").stat().st_size / 2**20
    print(f"\nmodel.safetensors: {size_mib:.0f} MiB float32, mesh fsdp=4 x tensor=2")
    for r in rows:
        print(f"  {r['quantize']:>4} {r['mode']:>14}: peak host RSS {r['peak_rss_mib']:.0f} MiB")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gguf_loads_into_the_mesh_unchanged(tmp_path, quantize):
    from test_gguf import TINY, T, random_state, write_gguf
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, random_state(TINY), qtype=T.Q8_0)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    got = load_pretrained(path, quantize=quantize, mesh=mesh).params
    want = load_pretrained(path, quantize=quantize).params
    assert split_shapes(got)
    for (name, a), (_, b) in zip(children(got), children(want)):
        assert {s.data.shape for s in a.addressable_shards} == {a.sharding.shard_shape(a.shape)}
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("shape, axis, names", [
    ((96, 64), 0, ("mlp", "embed")),  # a block straddles the fsdp shards; padding
    ((128, 96), 0, ("embed", "heads")),
    ((200, 64), 1, ("vocab", "embed")),  # an embedding table, blocks along d
    ((1100, 4096), 0, ("embed", "mlp")),  # over array.CHUNK: read in chunks
])
@pytest.mark.parametrize("kind, double_quant", [("nf4", True), ("nf4", False), ("int8", False)])
def test_quantize_sharded_is_quantize_bit_for_bit(shape, axis, names, kind, double_quant):
    import ml_dtypes
    from flax_adapters.quant import array as qarray
    from flax_adapters.quant.sharded import quantize_sharded
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    for dtype in (np.float32, ml_dtypes.bfloat16):
        w = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        want = qarray.quantize(w, kind, axis, 64, double_quant, np.float32)
        sh = sharding.tree_shardings(qarray.axes(want, names), want, mesh)
        got = quantize_sharded(lambda index: w[index], shape, kind, axis, 64, double_quant,
                               np.float32, sh)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for (name, a), (_, b), s in zip(children(got), children(want),
                                        jax.tree_util.tree_leaves(sh)):
            assert a.sharding == s, name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
