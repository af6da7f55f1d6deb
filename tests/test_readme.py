"""The README is true: its Python tour runs (on a tiny model in place of
`path/to/model`) and every line it prints is checked against an independent
computation, the tour imports only `flax_adapters` names, and every cell of
its adapters x families table runs numerically on a tiny random model of the
family: fresh adapters that are the identity leave the logits unchanged,
random adapter leaves change them (finite), mergeable methods merge into a
base whose logits equal the adapter's (the others refuse), and the adapter
saved in its interchange format loads back with the same logits. Parity with
the reference implementations (transformers, PEFT, LLM-Adapters) is the
business of the parity tests."""

import ast
import contextlib
import dataclasses
import io
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from families import REL_TOL, rel_err
import pytest

import flax_adapters as fa
from flax_adapters.models import abstract_params, config_from_hf
from flax_adapters.models.config import LlamaConfig
from flax_adapters.models.registry import family as model_family

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = '"path/to/model"'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def printed_claims(block: str) -> list[str]:
    """The labels of the claims a block prints as `print("<label>:", <bool>)`."""
    return [node.args[0].value[:-1] for node in ast.walk(ast.parse(block))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
            and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).endswith(":")]


def check_tour_output(out: str, claims: list[str], want: dict) -> None:
    """Every line the tour prints, against `want` (computed independently):
    each claim printed once and True, the parameter counts, the loss and the
    generated text."""
    lines = out.splitlines()
    printed = re.findall(r"^(.+): (True|False)$", out, flags=re.M)
    assert sorted(label for label, _ in printed) == sorted(claims), (printed, claims)
    assert all(value == "True" for _, value in printed), printed
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| "
                     r"trainable%: (\d+\.\d{4})", lines[0])
    assert m, lines[0]
    n_train, n_all = (int(g.replace(",", "")) for g in m.groups()[:2])
    assert (n_train, n_all) == (want["trainable"], want["all"]), (lines[0], want)
    assert m[3] == f"{100 * want['trainable'] / want['all']:.4f}", lines[0]
    m = re.fullmatch(r"loss (\d+\.\d{3})", lines[1])
    assert m and abs(float(m[1]) - want["loss"]) <= 6e-4, (lines[1], want["loss"])
    assert lines[-1] == repr([want["generated"]]), (lines[-1], want["generated"])
    assert len(lines) == 3 + len(claims), lines  # nothing printed that is not checked


def tour_expectations(ns: dict) -> dict:
    """What the tour's lines must say, from its own variables but not from the
    library functions that printed them."""
    pre, trained, cfg = ns["pre"], ns["trained"], ns["adapted"].cfg
    targets = set(cfg.target_modules)
    n_train = 0
    for path, x in jax.tree_util.tree_flatten_with_path(pre.params)[0]:
        keys = [k.key for k in path]
        if keys[-1] == "kernel" and keys[-2] in targets:  # LoRA: A (in, r) and B (r, out)
            n_train += cfg.r * (x.shape[0] + math.prod(x.shape[1:]))
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(pre.params)) + n_train
    # The loss of the first step is computed before its update, on the fresh adapter
    # (B = 0, no dropout): the base model's cross-entropy on the answer's tokens only.
    tokens = np.asarray(ns["tokens"][0])  # (1, t)
    base = fa.model_class(pre.config)(pre.config)
    base_logits = np.asarray(base.apply({"params": pre.params}, tokens)[0], np.float64)[0]
    logp = base_logits - np.log(np.exp(base_logits - base_logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - base_logits.max(-1, keepdims=True)
    ids, n_prompt = ns["ids"], ns["n_prompt"]
    answer_positions = range(n_prompt - 1, len(ids) - 1)  # position i predicts ids[i + 1]
    loss = -np.mean([logp[i, ids[i + 1]] for i in answer_positions])
    # Greedy decoding by full recomputation (no cache), with the trained adapter.
    tok = pre.tokenizer
    seq = list(tok(ns["prompt"])["input_ids"])
    new = []
    for _ in range(8):
        nxt = int(np.argmax(np.asarray(trained.apply(jnp.asarray([seq], jnp.int32))[0])[0, -1]))
        if nxt == tok.eos_token_id:
            break
        seq.append(nxt)
        new.append(nxt)
    return {"trainable": n_train, "all": n_all, "loss": float(loss),
            "generated": tok.decode(new, skip_special_tokens=True), "base_logits": base_logits}


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from tiny import make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # the blocks write out/adapter
    blocks = python_blocks()
    assert len(blocks) == 1 and PLACEHOLDER in blocks[0], "the checks below read one tour"
    claims = printed_claims(blocks[0])
    assert claims == ["merged == adapted", "loaded == trained"], claims
    ns = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0].replace(PLACEHOLDER, repr(str(model_dir))), str(README),  # noqa: S102
                     "exec"), ns)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    out = printed.getvalue()
    want = tour_expectations(ns)
    check_tour_output(out, claims, want)
    # The claims say something only if the step trained: merge and save/load of an
    # adapter that is still zero would print True for any merge. Its step moves the
    # logits by ~1e-2, 100x the tour's 1e-4 tolerance (a step at learning rate 0,
    # e.g. the first step of a warmup, moves them by exactly 0).
    reference = np.asarray(ns["reference"])[0]
    assert np.abs(reference - want["base_logits"]).max() > 10 * 1e-4
    # And the checks read what they check: each line broken in turn fails.
    broken = [out.replace(f"{c}: True", f"{c}: False") for c in claims]
    broken += ["\n".join(ln for ln in out.splitlines() if not ln.startswith(c)) for c in claims]
    broken += [out.replace(f"trainable params: {want['trainable']:,}",
                           f"trainable params: {want['trainable'] + 1:,}"),
               re.sub(r"loss (\d+\.\d{3})", lambda m: f"loss {float(m[1]) + 0.002:.3f}", out),
               out.replace(repr([want["generated"]]), repr([want["generated"] + " x"])),
               out + "extra: True\n"]
    for bad in broken:
        assert bad != out
        with pytest.raises(AssertionError):
            check_tour_output(bad, claims, want)


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


# ------------------------------------------------------------ the support table

def tiny_config(family: str):
    """2 layers, width 64, vocab 128: LLaMA, Mistral, Qwen2 (q/k/v biases) and
    Qwen3 (q/k norms) with GQA; the other families as tests/families.py builds
    them (its variant names: Gemma 3's text model is "gemma3")."""
    if family == "llama":
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16)
    transformers = pytest.importorskip("transformers")
    if family in ("mistral", "qwen2", "qwen3"):
        cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}[family]
        return config_from_hf(cls(vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16).to_dict())
    from families import hf_config

    return config_from_hf(hf_config({"gemma3_text": "gemma3"}.get(family, family)).to_dict())


# The README table's rows, as configs (targets: the family's preset), and their
# interchange format (adapter_config.json's peft_type).
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
PEFT_TYPE = {"LoRA": "LORA", "rsLoRA": "LORA", "DoRA": "LORA", "IA3": "IA3",
             "series (AdapterH)": "BOTTLENECK", "AdapterP": "BOTTLENECK",
             "parallel adapter": "BOTTLENECK", "prefix tuning": "PREFIX_TUNING",
             "prompt tuning": "PROMPT_TUNING", "P-tuning": "P_TUNING"}
INTERCHANGE = {"LORA": "PEFT", "IA3": "PEFT", "PREFIX_TUNING": "PEFT", "PROMPT_TUNING": "PEFT",
               "P_TUNING": "PEFT", "BOTTLENECK": "LLM-Adapters `BOTTLENECK`"}
MERGEABLE = {"LoRA", "rsLoRA", "DoRA", "IA3"}
# A fresh adapter of these is the identity (LoRA, rsLoRA: B = 0; DoRA: m = ||W||; IA3:
# l = 1); the bottleneck adapters' default init ("bert") and the virtual tokens are not.
IDENTITY_AT_INIT = MERGEABLE
# README column -> the model types its cells are run on.
COLUMNS = {"LLaMA, Mistral, Qwen2, Qwen3": ("llama", "mistral", "qwen2", "qwen3"),
           "BLOOM": ("bloom",), "OPT": ("opt",), "GPT-J": ("gptj",), "GPT-NeoX": ("gpt_neox",),
           "Gemma 2, Gemma 3": ("gemma2", "gemma3_text"), "Phi-3": ("phi3",),
           "Mixtral, Qwen3-MoE": ("mixtral", "qwen3_moe")}
# Cells the README marks "refused": the method's sites do not exist on the family
# (a mixture's MLP is expert stacks, not linear layers), and inject says so.
REFUSED = {(a, t) for a in ("series (AdapterH)", "AdapterP") for t in ("mixtral", "qwen3_moe")}


def cell(adapter: str, types: tuple[str, ...]) -> str:
    refused = {(adapter, t) in REFUSED for t in types}
    assert len(refused) == 1, (adapter, types)  # a column's types agree
    return "refused" if refused.pop() else "yes"


def adapter_config(adapter: str, model_type: str):
    """ADAPTERS[adapter] on a family; where PEFT has no default targets for
    the family (Phi-3's LoRA and IA3), the ones its tests name."""
    from families import NO_PEFT_DEFAULTS

    cfg = ADAPTERS[adapter]
    named = NO_PEFT_DEFAULTS.get(model_type, {})
    if isinstance(cfg, fa.LoraConfig) and "lora" not in model_family(model_type).presets.targets:
        return dataclasses.replace(cfg, target_modules=named["lora"])
    if isinstance(cfg, fa.IA3Config) and "ia3" not in model_family(model_type).presets.targets:
        return dataclasses.replace(cfg, target_modules=named["ia3"],
                                   feedforward_modules=named["ia3_feedforward"])
    return cfg


def readme_support_table() -> tuple[list[str], list[list[str]]]:
    section = README.read_text().split("## Supported adapters and model families")[1]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in section.split("\n\n")[1].splitlines()]
    return rows[0], rows[2:]


def test_support_table_is_what_the_cells_test():
    """The README's rows, columns, merge and interchange columns are the ones
    test_support_table_cell runs."""
    header, rows = readme_support_table()
    assert header == ["adapter", "file", *COLUMNS, "merge", "interchange"], header
    seen = []
    for adapter_names, _, *cells, merge, interchange in rows:
        for name in adapter_names.split(", "):
            seen.append(name)
            assert cells == [cell(name, types) for types in COLUMNS.values()], (name, cells)
            assert merge == ("yes" if name in MERGEABLE else "no"), (name, merge)
            assert interchange == INTERCHANGE[PEFT_TYPE[name]], (name, interchange)
    assert seen == list(ADAPTERS), seen


def random_base(cfg, seed: int = 0) -> dict:
    """A base tree of the family with weights N(0, 4 / fan_in) (logits of a few
    units, so that an adapter's effect shows), biases N(0, 0.04), norm
    weights 1 + N(0, 0.04)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    key, out = jax.random.key(seed), []
    for i, (path, s) in enumerate(flat):
        noise = jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
        if len(s.shape) >= 2:
            out.append(noise * 2 / math.sqrt(s.shape[0]))
        else:
            out.append(0.2 * noise if "bias" in path[-1].key else 1 + 0.2 * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def family_base():
    """model_type -> (config, base tree, jitted base logits), built once."""
    from tiny import padded_batch

    tokens, mask = (jnp.asarray(x) for x in padded_batch(128))
    built = {}

    def get(model_type):
        if model_type not in built:
            cfg = tiny_config(model_type)
            base = random_base(cfg)
            built[model_type] = cfg, base, logits_fn(cfg, None, tokens, mask)
        return built[model_type]
    return get


def logits_fn(cfg, adapter_cfg, tokens, mask):
    """tree -> logits at the valid positions of tests/tiny.py's padded batch."""
    model = fa.model_class(cfg)(cfg, settings=fa.settings_for(adapter_cfg, cfg.model_type))
    valid = np.asarray(mask, bool)
    apply = jax.jit(lambda p: model.apply({"params": fa.materialize(p)}, tokens,
                                          mask.astype(bool))[0])
    return lambda tree: np.asarray(apply(tree))[valid]


@pytest.mark.parametrize("family", [t for types in COLUMNS.values() for t in types])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_support_table_cell(family_base, tmp_path, family, adapter):
    from tiny import padded_batch, perturb

    cfg, base, base_logits_of = family_base(family)
    model_type = cfg.model_type
    adapter_cfg = adapter_config(adapter, model_type)
    if (adapter, model_type) in REFUSED:
        with pytest.raises(ValueError, match="expert"):
            fa.inject(base, adapter_cfg, jax.random.key(0), model_type)
        return
    tokens, mask = (jnp.asarray(x) for x in padded_batch(cfg.vocab_size))
    base_logits = base_logits_of(base)
    logits_of = logits_fn(cfg, adapter_cfg, tokens, mask)  # one compilation per cell

    fresh = fa.inject(base, adapter_cfg, jax.random.key(0), model_type)
    assert fa.num_params(fa.split(fresh).trainable) > 0, "the method added no adapter leaves"
    fresh_logits = logits_of(fresh)
    assert np.isfinite(fresh_logits).all()
    if adapter in IDENTITY_AT_INIT:
        # Exact up to additions of zeros and products with one, but XLA fuses the
        # adapted graph differently, and DoRA's m / ||W|| is 1 only up to float32
        # rounding: within the parity tolerance of the logit scale (REL_TOL; measured
        # 0..1.1e-6 on 2026-12-04); a wrong init (B != 0, m = 1, l = 0) is off by O(1).
        err = rel_err(fresh_logits, base_logits)
        print(f"{family} {adapter}: max |fresh - base| / max |logit| = {err:.1e}")
        assert err <= REL_TOL, err
    # Random, non-trivial adapter leaves: they move the logits (by >= ~1 on these
    # models; an adapter the model ignores moves them by 0).
    tree = perturb(fresh)
    logits = logits_of(tree)
    assert np.isfinite(logits).all()
    assert np.abs(logits - base_logits).max() > 0.1, "the adapter does not reach the outputs"

    if adapter in MERGEABLE:
        merged = fa.merge(tree, adapter_cfg)
        assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
        # float32 in another order: observed <= 6.1e-5 on logits of up to ~20; a merge
        # that drops or misplaces the update is off by the adapter's effect (>= ~1).
        np.testing.assert_allclose(base_logits_of(merged), logits, atol=2e-4)
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            fa.merge(tree, adapter_cfg)

    out = fa.save_adapter(fa.split(tree).trainable, adapter_cfg, tmp_path / "adapter",
                          model_type)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == \
        PEFT_TYPE[adapter]
    back, back_cfg = fa.load_adapter(out, base, model_type)
    # The loaded config runs the same sites, and the loaded tree gives the same logits.
    assert fa.settings_for(back_cfg, model_type) == fa.settings_for(adapter_cfg, model_type)
    np.testing.assert_allclose(logits_of(back), logits, atol=1e-6)
