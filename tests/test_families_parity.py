"""BLOOM, OPT, GPT-J and GPT-NeoX against transformers (PyTorch CPU): logits
on a left-padded batch, KV-cache decoding against full recomputation, and
greedy generation against transformers' `generate`.

Tiny random models are built by transformers, saved with save_pretrained
(safetensors) and loaded through our loader (tests/families.py). Tolerance
1e-4 in float32: both sides compute the same operations in float32 and
differ by summation order only (observed <= 4e-7). Greedy comparisons are
exact: these models' top-2 logit gaps are far above float32 rounding.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from families import FAMILIES, VARIANTS, VOCAB, save_tiny, tiny_models  # noqa: E402
from tiny import padded_batch  # noqa: E402

from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.generate import GenerationConfig, generate  # noqa: E402
from flax_adapters.models import init_cache, model_class  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (torch model, our Pretrained), built once per module."""
    get = tiny_models(tmp_path_factory)
    return lambda name: get(name)[1:]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tiny, name):
    torch_model, pre = tiny(name)
    tokens, mask = padded_batch(VOCAB)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    model = model_class(pre.config)(pre.config)
    ours, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[valid] - ref[valid]).max()
    print(f"{name}: max |ours - transformers| = {diff:.1e} (logits up to "
          f"{np.abs(ref[valid]).max():.2f})")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_prefill_then_decode_equals_full(tiny, name):
    _, pre = tiny(name)
    tokens, mask = padded_batch(VOCAB)
    model = model_class(pre.config)(pre.config)
    apply = jax.jit(model.apply)
    full, _ = apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    cache = init_cache(pre.config, 3, 16)
    first, cache = apply({"params": pre.params}, jnp.asarray(tokens[:, :8]),
                         jnp.asarray(mask[:, :8], bool), cache=cache)
    pieces = [first]
    for t in range(8, 12):
        step, cache = apply({"params": pre.params}, jnp.asarray(tokens[:, t:t + 1]),
                            jnp.asarray(mask[:, t:t + 1], bool), cache=cache)
        pieces.append(step)
    stepped = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    valid = mask.astype(bool)
    # Same float32 operations over a longer (masked) key axis: ~1e-7.
    np.testing.assert_allclose(stepped[valid], np.asarray(full)[valid], atol=1e-5)


PROMPTS = [[5, 17, 99, 3, 42], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers_generate(tiny, name):
    torch_model, pre = tiny(name)
    model = model_class(pre.config)(pre.config)
    width, pad, n_new = max(map(len, PROMPTS)), 0, 10
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        seqs = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=n_new, min_new_tokens=n_new,
                                    eos_token_id=None, pad_token_id=pad)
    ours = generate(model, pre.params, PROMPTS, GenerationConfig(
        max_new_tokens=n_new, eos_token_ids=(), pad_token_id=pad))
    np.testing.assert_array_equal(ours, seqs[:, width:].numpy())


def test_opt_generation_past_its_learned_positions_is_refused(tiny):
    _, pre = tiny("opt")  # max_position_embeddings=64
    model = model_class(pre.config)(pre.config)
    prompt = [[5] * 60]
    fits = generate(model, pre.params, prompt, GenerationConfig(max_new_tokens=5,
                                                                eos_token_ids=()))
    assert fits.shape == (1, 5)  # feeds positions 0..63: the last one there is
    with pytest.raises(ValueError, match="need 65 positions, but the model has 64"):
        generate(model, pre.params, prompt, GenerationConfig(max_new_tokens=6, eos_token_ids=()))


@pytest.mark.parametrize("name, rename", [
    # bigscience's BLOOM checkpoints are saved from the bare BloomModel: no "transformer.".
    ("bloom", lambda k: k.removeprefix("transformer.")),
    # OPT checkpoints saved from OPTModel: "decoder.layers..." without "model.".
    ("opt", lambda k: k.removeprefix("model.")),
    # GPT-NeoX's head: "embed_out" as published (transformers 5 also saves that name),
    # "lm_head" as transformers' module calls it.
    ("gpt_neox", lambda k: {"embed_out.weight": "lm_head.weight",
                            "lm_head.weight": "embed_out.weight"}.get(k, k)),
])
def test_published_checkpoint_spellings_load(tmp_path, name, rename):
    import shutil

    from safetensors.numpy import load_file, save_file

    save_tiny(tmp_path / "saved", name)
    pre = load_pretrained(tmp_path / "saved")
    (tmp_path / "renamed").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "renamed" / "config.json")
    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()},
              tmp_path / "renamed" / "model.safetensors")
    assert set(map(rename, tensors)) != set(tensors)
    again = load_pretrained(tmp_path / "renamed")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, pre.params)


def test_unknown_tensor_is_named(tiny, tmp_path):
    from safetensors.numpy import save_file

    _, pre = tiny("gptj")
    # one layer, as the file holds (a layer count the weights lack is refused first)
    (tmp_path / "config.json").write_text(__import__("json").dumps({**pre.hf_config, "n_layer": 1}))
    save_file({"transformer.h.0.attn.q_proj.weight": np.zeros((64, 64), np.float32),
               "transformer.h.0.attn.qkv_proj.weight": np.zeros((64, 64), np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.qkv_proj"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_at_selected_positions(tiny, name):
    """`logits_at_ba` (the train step's loss window) gives the full logits'
    rows at those positions: the head is per position."""
    _, pre = tiny(name)
    tokens, mask = padded_batch(VOCAB)
    model = model_class(pre.config)(pre.config)
    full, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool))
    at = jnp.asarray([[0, 5, 11], [4, 4, 7], [9, 10, 11]])
    picked, _ = model.apply({"params": pre.params}, jnp.asarray(tokens), jnp.asarray(mask, bool),
                            logits_at_ba=at)
    want = np.take_along_axis(np.asarray(full), np.asarray(at)[..., None], axis=1)
    np.testing.assert_allclose(picked, want, atol=1e-6)
