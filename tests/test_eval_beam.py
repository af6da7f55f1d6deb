"""Beam search (eval/beam.py): one beam equals greedy decoding, and 2-4 beams
equal transformers' `generate(num_beams=...)` token for token on a tiny random
LLaMA, with no EOS, one EOS and two EOS ids, on left-padded prompts of
different lengths.

Exact comparison is sound for the same reason as in test_generate.py: the
score gaps between competing beams of these random models (~1e-2) are far
above float32 rounding differences (~1e-6). EOS ids are picked from the
greedy output so that beams really finish early.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from eval.beam import beam_search  # noqa: E402
from flax_adapters.checkpoints import load_pretrained  # noqa: E402
from flax_adapters.generate import GenerationConfig, generate  # noqa: E402
from flax_adapters.models import LlamaForCausalLM  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
N_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    torch_model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    torch_model.save_pretrained(path)
    pre = load_pretrained(path)
    model = LlamaForCausalLM(pre.config)
    greedy = generate(model, pre.params, PROMPTS,
                      GenerationConfig(max_new_tokens=N_NEW, eos_token_ids=()))
    return torch_model, model, pre.params, greedy


def cut_at_eos(rows, eos):
    """Each row up to and including its first EOS (the rest is padding)."""
    out = []
    for row in np.asarray(rows).tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


def transformers_beams(torch_model, num_beams, eos):
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width), np.int64)
    mask = np.zeros_like(ids)
    for r, p in enumerate(PROMPTS):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=num_beams,
            do_sample=False, max_new_tokens=N_NEW, eos_token_id=list(eos) or None,
            pad_token_id=0, length_penalty=1.0, early_stopping=False)
    return out[:, width:].numpy()


def test_one_beam_is_greedy(tiny):
    _, model, params, greedy = tiny
    np.testing.assert_array_equal(beam_search(model, params, PROMPTS, 1, N_NEW, (), 0), greedy)
    eos = (int(greedy[0, 3]),)
    with_eos = generate(model, params, PROMPTS,
                        GenerationConfig(max_new_tokens=N_NEW, eos_token_ids=eos))
    assert cut_at_eos(beam_search(model, params, PROMPTS, 1, N_NEW, eos, 0), eos) == \
        cut_at_eos(with_eos, eos)


@pytest.mark.parametrize("num_beams", [2, 3, 4])
@pytest.mark.parametrize("eos_case", ["none", "one", "two"])
def test_beams_match_transformers(tiny, num_beams, eos_case):
    torch_model, model, params, greedy = tiny
    eos = {"none": (), "one": (int(greedy[0, 3]),),
           "two": (int(greedy[1, 2]), int(greedy[2, 5]))}[eos_case]
    ours = beam_search(model, params, PROMPTS, num_beams, N_NEW, eos, 0)
    assert cut_at_eos(ours, eos) == cut_at_eos(transformers_beams(torch_model, num_beams, eos), eos)


def test_bad_num_beams(tiny):
    _, model, params, _ = tiny
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, params, PROMPTS, 0, N_NEW, (), 0)
