"""Loading: bad inputs end in one clear error; full-size shapes cost nothing."""

import json

import jax
import numpy as np
import pytest

from flax_adapters.checkpoints import load_pretrained
from flax_adapters.checkpoints.hf import abstract_params, hf_state_to_params
from flax_adapters.checkpoints.safetensors_io import save_file
from flax_adapters.models.config import LLAMA3_8B, LLAMA_7B, LlamaConfig

HF_TINY = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


def write_tiny(directory, drop=(), extra=None, reshape=None):
    """A tiny random llama directory written with our safetensors writer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(HF_TINY))
    cfg = LlamaConfig.from_hf(HF_TINY)
    from flax_adapters.models.names import path_to_hf_name
    rng = np.random.default_rng(0)
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        keys = tuple(k.key for k in path)
        shape = leaf.shape[::-1] if keys[-1] in ("kernel", "lm_head") else leaf.shape
        name = path_to_hf_name(keys, HF_TINY["model_type"])
        state[name] = rng.standard_normal(shape).astype(np.float32)
    for name in drop:
        del state[name]
    state.update(extra or {})
    for name, shape in (reshape or {}).items():
        state[name] = np.zeros(shape, np.float32)
    save_file(state, directory / "model.safetensors")
    return directory


def test_round_trip_of_our_writer(tmp_path):
    pre = load_pretrained(write_tiny(tmp_path / "m"))
    assert pre.params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (16, 8)


@pytest.mark.parametrize("case, match", [
    ("missing_dir", "does not exist"),
    ("no_config", "no config.json"),
    ("bad_type", "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"),
    ("pickled_only", "pickled"),
    ("pickled_file", "pickled"),
    ("truncated", "truncated"),
    ("garbage_header", "does not fit the file"),
    ("missing_tensor", "missing 1 tensor"),
    ("unexpected_tensor", "unexpected tensor 'model.layers.0.extra.weight'"),
    ("misshaped", "'model.norm.weight' has shape (7,)"),
    ("bad_dtype", "dtype must be"),
    ("no_shards", "shards listed"),
])
def test_bad_inputs_give_one_clear_error(tmp_path, case, match):
    d = tmp_path / "m"
    kwargs = {}
    if case == "missing_dir":
        d = tmp_path / "nope"
    elif case == "no_config":
        d.mkdir()
    elif case == "bad_type":
        write_tiny(d)
        (d / "config.json").write_text(json.dumps({**HF_TINY, "model_type": "gpt2"}))
    elif case == "pickled_only":
        d.mkdir()
        (d / "config.json").write_text(json.dumps(HF_TINY))
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif case == "pickled_file":
        d.mkdir()
        d = d / "model.pt"
        d.write_bytes(b"\x80\x04")
    elif case == "truncated":
        f = write_tiny(d) / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif case == "garbage_header":
        write_tiny(d)
        (d / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")
    elif case == "missing_tensor":
        write_tiny(d, drop=["model.layers.0.mlp.up_proj.weight"])
    elif case == "unexpected_tensor":
        write_tiny(d, extra={"model.layers.0.extra.weight": np.zeros(3, np.float32)})
    elif case == "misshaped":
        write_tiny(d, reshape={"model.norm.weight": (7,)})
    elif case == "bad_dtype":
        write_tiny(d)
        kwargs["dtype"] = "float64"
    elif case == "no_shards":
        write_tiny(d)
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises((ValueError, FileNotFoundError), match=match.replace("(", r"\(")
                       .replace(")", r"\)")) as err:
        load_pretrained(d, **kwargs)
    assert "\n" not in str(err.value)


def test_sharded_checkpoint(tmp_path):
    d = write_tiny(tmp_path / "m")
    from flax_adapters.checkpoints.safetensors_io import iter_tensors
    state = {k: np.array(v) for k, v in iter_tensors(d / "model.safetensors")}
    (d / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, d / shard)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    pre = load_pretrained(d)
    np.testing.assert_array_equal(pre.params["norm"]["scale"], state["model.norm.weight"])


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("cfg, published", [(LLAMA_7B, 6_738_415_616),
                                            (LLAMA3_8B, 8_030_261_248)])
def test_full_size_parameter_counts_without_allocating(cfg, published):
    assert count(abstract_params(cfg)) == published


def test_state_with_wrong_shapes_names_the_tensor():
    cfg = LlamaConfig.from_hf(HF_TINY)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        hf_state_to_params(cfg, {"model.embed_tokens.weight": np.zeros((3, 3))})
