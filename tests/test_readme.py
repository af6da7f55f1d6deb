"""The README is true: its Python blocks run (on a tiny model in place of
`path/to/model`) and print what they claim, the tour imports only
`flax_adapters` names, and every cell of its adapters x families table works
on a tiny model of the family (shapes through jax.eval_shape; numerical
parity is the business of the parity tests)."""

import ast
import contextlib
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import flax_adapters as fa
from flax_adapters.models import abstract_params, config_from_hf
from flax_adapters.models.config import LlamaConfig

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = '"path/to/model"'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from tiny import make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # the blocks write out/adapter
    blocks = python_blocks()
    assert blocks and any(PLACEHOLDER in b for b in blocks)
    printed = io.StringIO()
    for block in blocks:
        code = block.replace(PLACEHOLDER, repr(str(model_dir)))
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    out = printed.getvalue()
    assert "merged == adapted: True" in out and "loaded == trained: True" in out, out
    assert re.search(r"trainable params: [\d,]+ \|\| all params", out), out
    assert re.search(r"loss \d+\.\d{3}", out), out


def test_readme_tour_imports_only_the_library_face():
    """The tour is written in `import flax_adapters as fa` (plus jax, functools)."""
    for block in python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] != "flax_adapters" or node.module == \
                    "flax_adapters", node.module
                assert node.module.split(".")[0] not in ("train", "eval"), node.module
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name in ("flax_adapters", "jax", "jax.numpy", "functools"), a.name


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16)
    pytest.importorskip("transformers")
    from families import hf_config

    return config_from_hf(hf_config(family).to_dict())


# The README table's rows, as configs (None targets: the family's preset).
ADAPTERS = {
    "LoRA": fa.LoraConfig(r=4),
    "rsLoRA": fa.LoraConfig(r=4, use_rslora=True),
    "DoRA": fa.LoraConfig(r=4, use_dora=True),
    "IA3": fa.IA3Config(),
    "series (AdapterH)": fa.BottleneckConfig(bottleneck_size=8),
    "AdapterP": fa.BottleneckConfig(bottleneck_size=8, use_adapterp=True),
    "parallel adapter": fa.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True),
    "prefix tuning": fa.PrefixConfig(num_virtual_tokens=3),
    "prompt tuning": fa.PromptTuningConfig(num_virtual_tokens=3),
    "P-tuning": fa.PTuningConfig(num_virtual_tokens=3),
}
MERGEABLE = {"LoRA", "rsLoRA", "DoRA", "IA3"}


@pytest.mark.parametrize("family", ["llama", "bloom", "opt", "gptj", "gpt_neox"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_support_table_cell(family, adapter):
    cfg, adapter_cfg = tiny_config(family), ADAPTERS[adapter]
    model_type = cfg.model_type
    base = abstract_params(cfg)
    params = jax.eval_shape(lambda b: fa.inject(b, adapter_cfg, jax.random.key(0), model_type),
                            base)
    assert fa.num_params(fa.split(params).trainable) > 0
    model = fa.model_class(cfg)(cfg, settings=fa.settings_for(adapter_cfg, model_type))
    tokens = jnp.zeros((2, 5), jnp.int32)
    logits, _ = jax.eval_shape(lambda p: model.apply({"params": fa.materialize(p)}, tokens),
                               params)
    assert logits.shape == (2, 5, cfg.vocab_size)
    if adapter in MERGEABLE:
        merged = jax.eval_shape(lambda p: fa.merge(p, adapter_cfg), params)
        assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
