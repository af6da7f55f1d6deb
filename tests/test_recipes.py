"""configs/: every LLM-Adapters recipe loads, carries the published
hyperparameters (AGI-Edgerunners/LLM-Adapters, math_running_commands, written
out below as the oracle), and on the real model shape (jax.eval_shape, through
the planner) trains exactly as many parameters as PEFT creates on
transformers' model on the meta device (LoRA, prefix tuning) or as
LLM-Adapters' bottleneck layers hold (series, parallel); the planner's
shortcut shapes equal the full eval_shape; and the planner runs on each
(its time is printed, never asserted)."""

import dataclasses
import functools
import pathlib
import time

import jax
import pytest

from flax_adapters.models import abstract_params, config_from_hf
from train import config as config_lib
from train import data as data_lib
from train import plan

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# model key -> (hub id, LoRA targets, series targets, parallel targets, remat), as in
# math_running_commands (LLaMA-13B: the 7B commands with --use_gradient_checkpointing).
MODELS = {
    "llama7b": ("yahma/llama-7b-hf", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                ["up_proj", "gate_proj"], ["up_proj", "down_proj"], False),
    "llama13b": ("yahma/llama-13b-hf", ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                 ["up_proj", "gate_proj"], ["up_proj", "down_proj"], True),
    "bloomz7b": ("bigscience/bloomz-7b1", ["query_key_value", "dense_4h_to_h", "dense_h_to_4h"],
                 ["dense_4h_to_h"], ["dense_4h_to_h", "dense_h_to_4h"], False),
    "gptj6b": ("EleutherAI/gpt-j-6b", ["q_proj", "k_proj", "v_proj", "fc_in", "fc_out"],
               ["fc_out"], ["fc_in", "fc_out"], False),
}
# method -> (batch_size, micro_batch_size, num_epochs, learning_rate, val_set_size)
METHODS = {"lora": (16, 4, 3, 3e-4, 0), "series": (16, 4, 3, 3e-4, 0),
           "parallel": (16, 4, 3, 3e-4, 0), "prefix": (8, 4, 5, 3e-2, 120)}
SERIES_VAL = {"llama7b": 120, "llama13b": 120}  # the LLaMA series commands hold out 120
RECIPES = [(m, a, t) for m in MODELS for t in ("math", "commonsense")
           for a in (("lora", "series", "parallel", "prefix") if t == "math"
                     else ("lora", "series", "parallel"))]
# LLM-Adapters' TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING (peft/tuners/bottleneck.py):
# a series adapter's width is the module's input ("mh_adapter") or output size.
SERIES_SIDE = {"llama": {"gate_proj": "in", "up_proj": "in", "down_proj": "out"},
               "bloom": {"dense_h_to_4h": "in", "dense_4h_to_h": "out"},
               "gptj": {"fc_in": "in", "fc_out": "out"}}


def recipe_path(model, method, task):
    return CONFIGS / f"{model}_{method}_{task}.yaml"


def test_configs_folder_holds_the_recipes():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert names == {recipe_path(*r).name for r in RECIPES} | {"default.yaml"}
    assert len(RECIPES) == 28


@pytest.mark.parametrize("recipe", RECIPES, ids="_".join)
def test_recipe_has_the_published_hyperparameters(recipe):
    model, method, task = recipe
    cfg = config_lib.load(str(recipe_path(*recipe)), [])
    hub, lora_t, series_t, parallel_t, remat = MODELS[model]
    batch, micro, epochs, lr, val = METHODS[method]
    val = SERIES_VAL.get(model, val) if method == "series" else val
    assert (cfg.model.path, cfg.model.remat) == (hub, remat)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.steps) == (batch, micro, epochs,
                                                                             None)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == (lr, 100, "linear")
    assert (cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (0.0, 1.0)
    assert (cfg.data.cutoff_len, cfg.data.val_set_size, cfg.data.train_on_inputs) == (256, val,
                                                                                      True)
    assert cfg.data.template == "llm_adapters"
    adapter = cfg.adapter.build()
    if method == "lora":
        assert (adapter.r, adapter.alpha, adapter.dropout) == (32, 64, 0.05)
        assert list(adapter.target_modules) == lora_t
    elif method == "prefix":
        assert (cfg.adapter.method, adapter.num_virtual_tokens) == ("prefix", 10)
    else:
        assert (adapter.bottleneck_size, adapter.non_linearity, adapter.scaling) == (256, "tanh",
                                                                                     1.0)
        assert (adapter.adapter_dropout, adapter.use_adapterp) == (0.0, False)
        assert adapter.use_parallel_adapter == (method == "parallel")
        assert list(adapter.target_modules) == (parallel_t if method == "parallel" else series_t)
    # the data path is the user's to set: a clear error until it is
    data_file = {"math": "math_10k.json", "commonsense": "commonsense_170k.json"}[task]
    assert cfg.data.path.endswith(data_file)
    with pytest.raises(FileNotFoundError, match="set data.path"):
        data_lib.check_source(cfg.data.path)


# --------------------------------------------------------------- counts vs references

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_families_full_size import CONFIGS as FAMILY_CONFIGS, MOE_CONFIGS  # noqa: E402
from test_qwen3 import QWEN3_8B  # noqa: E402
from test_families_full_size import meta_model  # noqa: E402


def bottleneck_reference(meta, model_type: str, targets, parallel: bool, size: int = 256) -> int:
    """LLM-Adapters' bottleneck adapters (down: width -> 256, up: 256 -> width, no
    biases) beside every targeted torch Linear of the meta model."""
    total = 0
    for name, module in meta.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, torch.nn.Linear):
            if parallel:
                total += size * (module.in_features + module.out_features)
            else:
                width = module.in_features if SERIES_SIDE[model_type][leaf] == "in" \
                    else module.out_features
                total += 2 * size * width
    return total


@functools.lru_cache(maxsize=None)
def references(model: str) -> tuple[int, dict]:
    """(base parameters, {method: trainable parameters}) of the references."""
    hub, lora_t, series_t, parallel_t, _ = MODELS[model]
    hf = plan.PUBLISHED_CONFIGS[hub]
    meta = meta_model(hf)
    return sum(p.numel() for p in meta.parameters()), {
        "lora": peft.get_peft_model(meta_model(hf), peft.LoraConfig(
            r=32, lora_alpha=64, lora_dropout=0.05, target_modules=lora_t)
        ).get_nb_trainable_parameters()[0],
        "prefix": peft.get_peft_model(meta_model(hf), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=10)).get_nb_trainable_parameters()[0],
        "series": bottleneck_reference(meta, hf["model_type"], series_t, parallel=False),
        "parallel": bottleneck_reference(meta, hf["model_type"], parallel_t, parallel=True),
    }


@pytest.mark.parametrize("recipe", RECIPES + [("default",)], ids="_".join)
def test_planner_counts_and_plans_every_config(recipe):
    path = CONFIGS / "default.yaml" if recipe == ("default",) else recipe_path(*recipe)
    cfg = config_lib.load(str(path), [])
    t0 = time.perf_counter()
    p = plan.make_plan(cfg, num_devices=4, device_kind="v4")
    seconds = time.perf_counter() - t0
    text = plan.format_plan(p)
    print(f"\n{path.name}: {p.trainable_params:,} trainable of {p.total_params:,}, "
          f"{p.total / plan.GiB:.2f} GiB per device of a v4-8 (4 chips), "
          f"{'fits' if p.fits else 'does not fit'}; planned in {seconds:.2f} s")
    assert p.fits is not None and "memory per device" in text and "sharding" in text
    assert all(n > 0 for n in p.memory.values())
    if recipe != ("default",):
        base, trainable = references(recipe[0])
        assert p.trainable_params == trainable[recipe[1]]
        assert p.total_params == base + p.trainable_params


@pytest.mark.parametrize("model", list(MODELS))
def test_planner_shapes_equal_the_full_eval_shape(model):
    """base_shapes repeats one traced layer; it must equal tracing all of them."""
    cfg = config_from_hf(plan.PUBLISHED_CONFIGS[MODELS[model][0]])
    shortcut = plan.base_shapes(cfg)[0]
    full = abstract_params(cfg)
    assert jax.tree_util.tree_structure(shortcut) == jax.tree_util.tree_structure(full)
    assert jax.tree_util.tree_leaves(shortcut) == jax.tree_util.tree_leaves(full)


@pytest.mark.parametrize("hub", ["bigscience/bloomz-7b1", "EleutherAI/gpt-j-6b", "Qwen/Qwen3-8B",
                                 "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct",
                                 "mistralai/Mixtral-8x7B-v0.1"])
def test_published_table_matches_the_family_tests_configs(hub):
    """The planner's table and tests/test_families_full_size.py's copies of the
    hub config.json give the same model (token ids aside: the plan needs none)."""
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    family_configs = {**FAMILY_CONFIGS, **MOE_CONFIGS, "Qwen/Qwen3-8B": QWEN3_8B}
    theirs = dataclasses.replace(config_from_hf(family_configs[hub]), **ids)
    assert config_from_hf(plan.PUBLISHED_CONFIGS[hub]) == theirs


@pytest.mark.slow  # reads the SmolLM2 GGUF header (seconds)
def test_default_entry_is_the_embedded_models_header():
    from flax_adapters.checkpoints import default_model_path
    from flax_adapters.checkpoints.gguf import read_gguf_config

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    header = dataclasses.replace(config_from_hf(read_gguf_config(path)), **ids)
    assert config_from_hf(plan.PUBLISHED_CONFIGS["default"]) == header
