"""Prefix tuning, prompt tuning and P-tuning against peft 0.21 (PyTorch CPU).

Same weights on both sides; tiny random LLaMAs (MHA and GQA) built by
transformers, re-initialised by `families.sensitize` (logits up to ~35,
peaked attention), saved and loaded by our loader. Comparisons are relative:
max |ours - peft| / max |peft logit| over the valid positions, with the
model parity tests' REL_TOL = 1e-5 (float32). Measured on 2026-12-04 (AMD
EPYC): 5e-7..1.8e-6 against PEFT, 1.4e-6..1.7e-6 cached decoding against
the full computation, a margin of > 5x; PEFT's initial prompt / prefix
moves the logits of the unpadded row by 0.72..1.50 of their scale, asserted
at 100x REL_TOL.

Positions on left-padded rows (see prompt.py): PEFT shifts explicit
position ids by P for prefix tuning, so we pass it the padding-invariant ids
our model uses by default; for prompt tuning / P-tuning PEFT ignores
position ids and numbers the whole padded row, which our model reproduces
with `positions_bt = arange(t)`. Unpadded rows agree with the defaults.
"""

import json

import numpy as np
from families import REL_TOL, rel_err, sensitize
from tiny import padded_batch as tiny_padded_batch
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flax_adapters as fa  # noqa: E402
from flax_adapters import num_params, split  # noqa: E402
from flax_adapters.adapters import prefix, prompt  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.models.registry import abstract_params  # noqa: E402
from flax_adapters.models import LlamaForCausalLM, init_cache  # noqa: E402
from flax_adapters.models.config import LLAMA_7B  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256)
MT = "llama"  # the tiny models' pre.config.model_type
HEADS = {"mha": dict(num_attention_heads=4, num_key_value_heads=4),
         "gqa": dict(num_attention_heads=4, num_key_value_heads=2)}
P = 5

PEFT_CONFIGS = {
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix_projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
        encoder_hidden_size=24),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                 encoder_hidden_size=24),
}
OURS = {
    "prefix": prefix.PrefixConfig(num_virtual_tokens=P),
    "prefix_projection": prefix.PrefixConfig(num_virtual_tokens=P, prefix_projection=True,
                                             encoder_hidden_size=24),
    "prompt": prompt.PromptTuningConfig(num_virtual_tokens=P),
    "p_tuning": prompt.PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=24),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'mha' | 'gqa': (directory, Pretrained)} of tiny random LLaMAs."""
    out = {}
    for name, heads in HEADS.items():
        torch.manual_seed(0)
        model = sensitize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **heads)))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, load_pretrained(path))
    return out



def padded_batch():
    return tiny_padded_batch(TINY["vocab_size"])


def peft_logits(model, is_prefix, tokens, mask):
    """PEFT's logits for the real tokens (see the module docstring on positions)."""
    kwargs = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
    if is_prefix:
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
        out = model(**kwargs).logits.numpy()
    return out if is_prefix else out[:, P:]


def our_logits(pre, tree, cfg, tokens, mask, peft_positions):
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    kwargs = {}
    if peft_positions and not isinstance(cfg, prefix.PrefixConfig):
        kwargs["positions_bt"] = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Eager: a jitted forward compiles anew for each config (~1.5 s).
    out, _ = model.apply({"params": fa.materialize(tree)}, jnp.asarray(tokens),
                         jnp.asarray(mask, bool), **kwargs)
    return np.asarray(out)


def peft_encoder_to_ours(pm, method):
    """The trainable encoder of a PEFT model in training mode, as our tree leaves."""
    sd = {k.split("prompt_encoder.default.")[1]: v.detach().numpy()
          for k, v in pm.named_parameters() if "prompt_encoder.default." in k}
    j = lambda x: jnp.asarray(x)  # noqa: E731
    if method == "prefix_projection":
        return {prefix.ENCODER: {
            "embedding": j(sd["embedding.weight"]),
            "dense_in": j(sd["transform.0.weight"].T), "dense_in_bias": j(sd["transform.0.bias"]),
            "dense_out": j(sd["transform.2.weight"].T),
            "dense_out_bias": j(sd["transform.2.bias"])}}
    return {prompt.ENCODER: {
        "embedding": j(sd["embedding.weight"]),
        "dense_in": j(sd["mlp_head.0.weight"].T), "dense_in_bias": j(sd["mlp_head.0.bias"]),
        "dense_mid": j(sd["mlp_head.2.weight"].T), "dense_mid_bias": j(sd["mlp_head.2.bias"]),
        "dense_out": j(sd["mlp_head.4.weight"].T), "dense_out_bias": j(sd["mlp_head.4.bias"])}}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_matches_peft(tiny, tmp_path, heads, method):
    path, pre = tiny[heads]
    is_prefix = method.startswith("prefix")
    torch.manual_seed(1)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(path),
                             PEFT_CONFIGS[method]()).eval()
    tokens, mask = padded_batch()
    valid = mask.astype(bool)
    ref = peft_logits(pm, is_prefix, tokens, mask)

    # PEFT-saved adapter -> ours (a reparameterised one arrives folded, as PEFT saves it).
    pm.save_pretrained(tmp_path / "peft")
    tree, cfg = fa.load_adapter(tmp_path / "peft", pre.params, MT)
    assert type(cfg) is type(OURS[method])
    ours = our_logits(pre, tree, cfg, tokens, mask, peft_positions=True)
    diffs = {"import": rel_err(ours[valid], ref[valid])}
    base = our_logits(pre, pre.params, None, tokens, mask, peft_positions=False)
    moved = rel_err(ref[0], base[0])  # the unpadded row: the prompt's effect alone
    # Our defaults agree with PEFT's on an unpadded row.
    ours_default = our_logits(pre, tree, cfg, tokens, mask, peft_positions=False)
    diffs["default positions, unpadded row"] = rel_err(ours_default[0], ref[0])
    if method in ("prefix_projection", "p_tuning"):
        # The encoder itself, computed by our code from PEFT's trainable weights.
        tree = {**pre.params, **peft_encoder_to_ours(pm, method)}
        cfg = OURS[method]
        ours = our_logits(pre, tree, cfg, tokens, mask, peft_positions=True)
        diffs["encoder"] = rel_err(ours[valid], ref[valid])

    # Ours -> PEFT: PeftModel.from_pretrained loads our export.
    fa.save_adapter(tree, cfg, tmp_path / "ours", MT)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == pm.peft_config["default"].peft_type.value
    assert config["num_virtual_tokens"] == P
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(path),
                                            tmp_path / "ours").eval()
    diffs["export"] = rel_err(peft_logits(loaded, is_prefix, tokens, mask)[valid], ref[valid])
    print(f"{method}/{heads}: max |ours - peft| / max |logit|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + f" (moved {moved:.2f})")
    assert moved > 100 * REL_TOL, "the prompt should change the outputs, or the test proves nothing"
    assert max(diffs.values()) <= REL_TOL, diffs


@pytest.mark.parametrize("method", ["prefix", "prefix_projection", "prompt", "p_tuning"])
def test_cached_decode_equals_full(tiny, method):
    _, pre = tiny["gqa"]
    cfg = OURS[method]
    tree = fa.materialize(fa.inject(pre.params, cfg, jax.random.key(0), MT))
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    apply = jax.jit(model.apply)
    tokens, mask = padded_batch()
    variables = {"params": tree}
    full, _ = apply(variables, jnp.asarray(tokens), jnp.asarray(mask, bool))
    cache = init_cache(pre.config, 3, 16)
    first, cache = apply(variables, jnp.asarray(tokens[:, :8]), jnp.asarray(mask[:, :8], bool),
                         cache=cache)
    if method in ("prompt", "p_tuning"):  # the prompt took P more slots, once
        assert cache["valid"].shape == (3, 16 + P) and int(cache[
            "prompt_tokens"]) == P
    else:
        assert cache["valid"].shape == (3, 16)
    pieces = [first]
    for t in range(8, 12):
        step, cache = apply(variables, jnp.asarray(tokens[:, t:t + 1]),
                            jnp.asarray(mask[:, t:t + 1], bool), cache=cache)
        pieces.append(step)
    stepped = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    valid = mask.astype(bool)
    err = rel_err(stepped[valid], np.asarray(full)[valid])
    print(f"{method}: max |cached - full| / max |logit| = {err:.1e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_equals_greedy_recomputation(tiny, method):
    from flax_adapters.generate import GenerationConfig, generate

    _, pre = tiny["gqa"]
    cfg = OURS[method]
    tree = fa.inject(pre.params, cfg, jax.random.key(0), MT)
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(cfg, MT))
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    new = generate(model, tree, prompts, GenerationConfig(max_new_tokens=4, eos_token_ids=()))
    # Greedy by full recomputation, rows left-padded to one width (one compile).
    apply, width = jax.jit(model.apply), 9
    ids = [list(p) for p in prompts]
    for _ in range(4):
        tokens = np.array([[0] * (width - len(r)) + r for r in ids])
        valid = np.array([[False] * (width - len(r)) + [True] * len(r) for r in ids])
        out, _ = apply({"params": tree}, jnp.asarray(tokens), jnp.asarray(valid))
        for r, nxt in zip(ids, np.asarray(jnp.argmax(out[:, -1], -1))):
            r.append(int(nxt))
    assert new.tolist() == [r[len(p):] for r, p in zip(ids, prompts)]


def test_prompt_text_init_matches_peft(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)}
    vocab["<unk>"] = 100
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(
        tmp_path / "tok")
    path, pre = tiny["mha"]
    for text in ("w3 w7 w9", "w1 w2 w3 w4 w5 w6 w7 w8"):  # repeated to P, truncated to P
        pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(path),
                                 peft.PromptTuningConfig(
                                     task_type="CAUSAL_LM", num_virtual_tokens=P,
                                     prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                     tokenizer_name_or_path=str(tmp_path / "tok")))
        want = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
        cfg = prompt.PromptTuningConfig(num_virtual_tokens=P, init="text", init_text=text,
                                        tokenizer_name_or_path=str(tmp_path / "tok"))
        ours = fa.inject(pre.params, cfg, jax.random.key(0), MT)["prompt_embeddings"]
        np.testing.assert_array_equal(np.asarray(ours), want)
    assert prompt.text_token_ids([3, 7, 9], P) == [3, 7, 9, 3, 7]


def test_structure(tiny):
    _, pre = tiny["gqa"]  # d=64, kv width 32, 2 layers

    def shapes(cfg):
        adapter = split(fa.inject(pre.params, cfg, jax.random.key(0), MT)).trainable
        return jax.tree_util.tree_map(lambda x: tuple(x.shape), adapter)

    assert shapes(OURS["prompt"]) == {"prompt_embeddings": (P, 64)}
    assert shapes(OURS["p_tuning"]) == {"prompt_encoder": {
        "embedding": (P, 64), "dense_in": (64, 24), "dense_in_bias": (24,),
        "dense_mid": (24, 24), "dense_mid_bias": (24,), "dense_out": (24, 64),
        "dense_out_bias": (64,)}}
    plain = {f"layers_{i}": {"self_attn": {"prefix_k": (P, 32), "prefix_v": (P, 32)}}
             for i in range(2)}
    assert shapes(OURS["prefix"]) == plain
    assert shapes(OURS["prefix_projection"]) == {"prefix_encoder": {
        "embedding": (P, 32), "dense_in": (32, 24), "dense_in_bias": (24,),
        "dense_out": (24, 2 * 2 * 32), "dense_out_bias": (2 * 2 * 32,)}}
    # materialize works on the bare trainable part too, as a loss function uses it.
    encoder = split(fa.inject(pre.params, OURS["prefix_projection"], jax.random.key(0),
                              MT)).trainable
    assert jax.tree_util.tree_map(lambda x: tuple(x.shape), fa.materialize(encoder)) == plain
    folded = prompt.fold(fa.inject(pre.params, OURS["p_tuning"], jax.random.key(0), MT))
    assert folded["prompt_embeddings"].shape == (P, 64) and "prompt_encoder" not in folded


def test_flat_prefix_round_trip(tiny):
    _, pre = tiny["gqa"]
    flat = jax.random.normal(jax.random.key(0), (P, 2 * 2 * 32))
    tree = prefix.with_flat_prefix(pre.params, flat)
    chex.assert_trees_all_equal(prefix.flat_prefix(tree), flat)
    # PEFT's layout: [layer][key | value][td]
    np.testing.assert_array_equal(tree["layers_1"]["self_attn"]["prefix_v"], flat[:, 96:128])


def test_errors(tiny, tmp_path):
    path, pre = tiny["gqa"]
    tokens = jnp.zeros((1, 3), jnp.int32)
    encoder = fa.inject(pre.params, OURS["prefix_projection"], jax.random.key(0), MT)
    model = LlamaForCausalLM(pre.config, settings=fa.settings_for(OURS["prefix_projection"], MT))
    with pytest.raises(ValueError, match="materialize"):
        model.apply({"params": encoder}, tokens)
    plain = fa.inject(pre.params, OURS["prefix"], jax.random.key(0), MT)
    with pytest.raises(ValueError, match="settings_for"):  # positions would be wrong
        LlamaForCausalLM(pre.config).apply({"params": plain}, tokens)
    with pytest.raises(ValueError, match="LSTM"):
        prompt.PTuningConfig(encoder_reparameterization_type="LSTM")
    # A prefix saved for the MHA model does not fit the GQA one.
    mha_path, _ = tiny["mha"]
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(mha_path),
                             PEFT_CONFIGS["prefix"]())
    pm.save_pretrained(tmp_path / "mha_prefix")
    with pytest.raises(ValueError, match="another model"):
        fa.load_adapter(tmp_path / "mha_prefix", pre.params, MT)


def test_llama7b_trainable_counts():
    base = abstract_params(LLAMA_7B)
    counts = {}
    for name, cfg in {"prefix (30 tokens)": prefix.PrefixConfig(num_virtual_tokens=30),
                      "prompt (20 tokens)": prompt.PromptTuningConfig(num_virtual_tokens=20),
                      "p-tuning (20 tokens)": prompt.PTuningConfig(num_virtual_tokens=20)}.items():
        tree = jax.eval_shape(lambda b, cfg=cfg: fa.inject(b, cfg, jax.random.key(0), MT), base)
        counts[name] = num_params(split(tree).trainable)
        print(f"LLaMA-7B {name}: {counts[name]:,} trainable parameters")
    assert counts["prefix (30 tokens)"] == 30 * 32 * 2 * 4096  # 7,864,320
    assert counts["prompt (20 tokens)"] == 20 * 4096
    assert counts["p-tuning (20 tokens)"] == 20 * 4096 + 3 * (4096 * 4096 + 4096)
