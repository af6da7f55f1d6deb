"""Every adapter `python -m train` writes loads in `python -m eval`.

For each method: a short `train.loop.run` on the tiny model, then eval's
loader (`eval.generator.load_generator`, what `python -m eval --adapter`
calls) on the exported directory. Its logits must equal those of the
trained state restored from the run's last orbax checkpoint -- two
independent paths (the export + import, and the checkpoint) to the same
numbers -- and `python -m eval --adapter` must run on it end to end.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

from tiny import make_model_dir, run_config  # noqa: E402

import flax_adapters as fa  # noqa: E402
from eval.__main__ import main as eval_main  # noqa: E402
from eval.generator import load_generator  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.loop import build, run  # noqa: E402

# adapter settings per method, as `python -m train adapter.method=... adapter.settings=...`
METHODS = {
    "lora": ("lora", "{r: 4, alpha: 8, dropout: 0.1}"),
    "dora": ("lora", "{r: 4, alpha: 8, use_dora: true}"),
    "ia3": ("ia3", "{}"),
    "series": ("bottleneck", "{bottleneck_size: 8}"),
    "adapterp": ("bottleneck", "{bottleneck_size: 8, use_adapterp: true}"),
    "parallel": ("bottleneck", "{bottleneck_size: 8, use_parallel_adapter: true, "
                 "scaling: learned}"),
    "prefix": ("prefix", "{num_virtual_tokens: 4, prefix_projection: true}"),
    "prompt": ("prompt", "{num_virtual_tokens: 4}"),
    "p_tuning": ("p_tuning", "{num_virtual_tokens: 4}"),
    "full": ("full", "{}"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("name", list(METHODS))
def test_eval_loads_what_train_wrote(model_dir, tmp_path, name):
    method, settings = METHODS[name]
    out = tmp_path / "run"
    cfg = run_config(model_dir, out, "steps=3", "optim.lr=3e-2", f"adapter.method={method}",
                     f"adapter.settings={settings}", "mesh.data=1")
    summary = run(cfg, devices=jax.devices()[:1])
    exported = out / ("model" if name == "full" else "adapter")
    assert summary["adapter_dir"] == str(exported)

    # The trained state, restored from the last checkpoint of the run.
    s = build(cfg, devices=jax.devices()[:1])
    step, state, _ = Checkpointer(out / "checkpoints", 1).restore_latest(s.state)
    assert step == 3
    trained = fa.materialize(fa.combine(s.frozen, state.trainable))
    untrained = fa.materialize(fa.combine(s.frozen, s.state.trainable))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 40, (2, 9)), jnp.int32)
    want = np.asarray(s.model.apply({"params": trained}, tokens)[0])
    fresh = np.asarray(s.model.apply({"params": untrained}, tokens)[0])
    assert np.abs(want - fresh).max() > 1e-3  # training changed the model

    generator = load_generator(str(model_dir), str(exported))
    got = np.asarray(generator.model.apply({"params": generator.params}, tokens)[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 export: rounding only

    records = [{"instruction": "Tom has 3 apples. He gets 2 more. How many apples does Tom "
                               "have now?", "input": "", "output": "", "answer": "5"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert eval_main(["--dataset", "gsm8k", "--data_path", str(tmp_path / "data.json"),
                      "--model", str(model_dir), "--adapter", str(exported),
                      "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "4"]) == 0
    result = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert result["datasets"]["gsm8k"]["n"] == 1
