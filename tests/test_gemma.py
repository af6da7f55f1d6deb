"""Gemma's config.json reading (models/gemma.py) against transformers' own
reading of the same file: the layer types, each layer type's rope, the
window, the query scale and the soft-caps, in the published spellings (no
layer_types; Gemma 3's sliding_window_pattern, rope_local_base_freq and
rope_scaling), in transformers 5's (layer_types, rope_parameters per layer
type), and with fields left out (transformers' save_pretrained writes only
those that differ from its defaults). And the configs we refuse, each with
an error that names what is wrong. (The models' parity: test_families_parity.py.)
"""

import pytest

transformers = pytest.importorskip("transformers")

from test_families_full_size import CONFIGS  # noqa: E402

from flax_adapters.models import config_from_hf  # noqa: E402
from flax_adapters.models.gemma import FULL, SLIDING  # noqa: E402

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
             num_attention_heads=4, num_key_value_heads=2)
READ = {
    "gemma-2-9b": CONFIGS["google/gemma-2-9b"],
    "gemma-3-1b": CONFIGS["google/gemma-3-1b-pt"],
    # gemma-3-4b-it's text_config (its other fields: transformers' defaults)
    "gemma-3-4b text": {"model_type": "gemma3_text", "hidden_size": 2560,
                        "intermediate_size": 10240, "num_hidden_layers": 34,
                        "num_attention_heads": 8, "vocab_size": 262208,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
    "gemma 1, hidden_act 'gelu'": {"model_type": "gemma", "hidden_act": "gelu", **SIZES},
    "gemma2, defaults": {"model_type": "gemma2", **SIZES},
    "gemma3_text, defaults": {"model_type": "gemma3_text", **SIZES},
    "gemma3_text, pattern 3": {"model_type": "gemma3_text", "sliding_window_pattern": 3,
                               "rope_theta": 5e5, "rope_local_base_freq": 2e4, **SIZES},
}


def rope_of(params: dict) -> tuple[float, float | None]:
    return params["rope_theta"], params.get("factor") if params["rope_type"] == "linear" else None


@pytest.mark.parametrize("name", list(READ))
def test_config_reads_as_transformers_reads_it(name):
    hf = READ[name]
    theirs = transformers.AutoConfig.for_model(**hf)
    for spelling in (hf, theirs.to_dict()):  # as published, and as transformers 5 writes it
        ours = config_from_hf(spelling)
        assert ours.layer_types == tuple(getattr(theirs, "layer_types", None)
                                         or (FULL,) * theirs.num_hidden_layers)
        rope = theirs.rope_parameters
        by_type = rope if FULL in rope else {FULL: rope, SLIDING: rope}
        scale = lambda s: None if s is None else s.factor  # noqa: E731
        assert (ours.rope_theta, scale(ours.rope_scaling)) == rope_of(by_type[FULL])
        assert (ours.rope_local_theta, scale(ours.rope_local_scaling)) == rope_of(by_type[SLIDING])
        assert ours.head_dim == theirs.head_dim
        if ours.model_type == "gemma":
            assert ours.hidden_activation == theirs.hidden_act == "gelu_pytorch_tanh"
            assert ours.query_pre_attn_scalar == theirs.head_dim  # scores * head_dim^-1/2
            continue
        assert ours.hidden_activation == theirs.hidden_activation
        assert ours.sliding_window == theirs.sliding_window
        assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar
        assert ours.final_logit_softcapping == theirs.final_logit_softcapping
        # Gemma 3's attention never applies attn_logit_softcapping (transformers drops it)
        assert ours.attn_logit_softcapping == (theirs.attn_logit_softcapping
                                               if ours.model_type == "gemma2" else None)


def test_gemma3_1b_alternates_five_sliding_layers_and_one_full():
    types = config_from_hf(CONFIGS["google/gemma-3-1b-pt"]).layer_types
    assert types[:6] == (SLIDING,) * 5 + (FULL,) and types.count(FULL) == 4


@pytest.mark.parametrize("change, error", [
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **SIZES}},
     "multimodal Gemma3ForConditionalGeneration.*use a text checkpoint"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0},
                          "sliding_attention": {"rope_type": "default"}}},
     "unsupported rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "rope_parameters are per layer type"),
    ({"layer_types": ["sliding_attention"] * 3}, "for each of the 7 layers"),
    ({"layer_types": ["chunked_attention"] * 7}, "for each of the 7 layers"),
    ({"sliding_window": None}, "sliding layers but sliding_window is None"),
    ({"final_logit_softcapping": 0.0}, "final_logit_softcapping must be positive"),
    ({"hidden_activation": "swiglu"}, "unsupported hidden activation 'swiglu'"),
])
def test_unsupported_configs_are_refused_by_name(change, error):
    with pytest.raises(ValueError, match=error):
        config_from_hf({"model_type": "gemma3_text", **SIZES, **change})


def test_prompt_text_init_matches_peft(tmp_path):
    """PEFT's TEXT init takes the rows through Gemma's scaled embedding
    module (x sqrt(d)); ours must give the same prompt (raw rows were 8x
    smaller on width 64)."""
    peft = pytest.importorskip("peft")
    import jax
    import numpy as np
    from families import save_tiny
    from tokenizers import Tokenizer, models, pre_tokenizers

    import flax_adapters as fa
    from flax_adapters.adapters import prompt
    from flax_adapters.checkpoints import load_pretrained

    vocab = {f"w{i}": i for i in range(100)} | {"<unk>": 100}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(
        tmp_path / "tok")
    model = save_tiny(tmp_path / "model", "gemma2")
    pre = load_pretrained(tmp_path / "model")
    text = "w3 w7 w9"
    pm = peft.get_peft_model(model, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "tok")))
    want = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    cfg = prompt.PromptTuningConfig(num_virtual_tokens=5, init="text", init_text=text,
                                    tokenizer_name_or_path=str(tmp_path / "tok"))
    ours = np.asarray(fa.inject(pre.params, cfg, jax.random.key(0), "gemma2")["prompt_embeddings"])
    raw = np.asarray(pre.params["embed_tokens"])[[3, 7, 9, 3, 7]]
    assert np.abs(want - raw).max() > 1  # the scale shows
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=0)
