"""`python -m eval` on a mesh of 8 fake CPU devices: the base read straight
into its training sharding, prompts data-parallel, and the same greedy
answers as one device.

float32: the partitioned matmuls only reorder float32 sums (~1e-7 of the
logits), far below the gaps between the tiny model's top logits, so every
generation must be equal. bfloat16 compute and NF4 / int8 bases: the run
must give what one device gives with the same dtype and quantization.
"""

import json

import pytest

from eval.__main__ import main
from eval.generator import load_generator
from eval.run import EvalConfig, mesh_config, run
from flax_adapters import sharding
from train import arith
from tiny import make_model_dir

N = 12  # two batches of 8: one bucket of 8 rows, one of 4 padded to 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sharded")
    _, test = arith.make_split(16, N, seed=0)
    data = root / "arith.json"
    data.write_text(json.dumps(test))
    return make_model_dir(root / "model"), data, root


def evaluate(setup, name, **kwargs):
    model, data, root = setup
    summary = run(EvalConfig(datasets=("gsm8k",), output_dir=str(root / name), data_path=str(data),
                             model=str(model), batch_size=8, max_new_tokens=12, **kwargs))
    rows = [json.loads(ln) for ln in (root / name / "gsm8k.jsonl").read_text().splitlines()]
    return [r["generation"] for r in rows], summary["datasets"]["gsm8k"]["accuracy"]


@pytest.fixture(scope="module")
def one_device(setup):
    return evaluate(setup, "one_device")


@pytest.mark.parametrize("mesh", ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"])
def test_float32_on_a_mesh_gives_the_one_device_answers(setup, one_device, mesh):
    generations, accuracy = evaluate(setup, mesh.replace(",", "_"), mesh=mesh)
    assert len(set(generations)) > 1  # not a degenerate model that says one thing
    assert generations == one_device[0] and accuracy == one_device[1]


@pytest.mark.parametrize("compute_dtype, quantize", [("bfloat16", "none"), ("float32", "nf4"),
                                                     ("bfloat16", "nf4"), ("float32", "int8")])
def test_bf16_and_quantized_on_a_mesh_give_the_one_device_answers(setup, compute_dtype,
                                                                  quantize):
    kw = dict(compute_dtype=compute_dtype, quantize=quantize)
    want = evaluate(setup, f"one_{compute_dtype}_{quantize}", **kw)
    got = evaluate(setup, f"mesh_{compute_dtype}_{quantize}", mesh="data=2,fsdp=2,tensor=2", **kw)
    assert got == want


def test_the_base_is_sharded_as_in_training(setup):
    model, _, _ = setup
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    gen = load_generator(str(model), None, quantize="nf4", mesh=mesh)
    kernel = gen.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.codes.sharding.mesh == mesh
    assert kernel.codes.addressable_shards[0].data.shape == (16, 16)  # (32 / 2, 32 / 2) of (32, 32)


@pytest.mark.parametrize("spec, match", [
    ("data=3", "needs 3 devices, but 8 are available"),
    ("data=2,model=4", "each axis one of data, fsdp, tensor"),
    ("data=two", "is not an integer"),
    ("data=0", "device count >= 1"),
    ("data=-1,fsdp=-1", "at most one axis may be -1"),
])
def test_bad_mesh_gives_one_clear_error(setup, capsys, spec, match):
    model, data, root = setup
    assert main(["--dataset", "gsm8k", "--data_path", str(data), "--output_dir",
                 str(root / "bad"), "--model", str(model), "--mesh", spec]) == 2
    assert match in capsys.readouterr().err


def test_bad_dtype_and_quantize_values(tmp_path):
    with pytest.raises(ValueError, match="--quantize must be one of none, nf4, int8"):
        EvalConfig(datasets=("gsm8k",), output_dir=str(tmp_path), data_path="x", quantize="q4")
    with pytest.raises(ValueError, match="--compute_dtype must be one of"):
        EvalConfig(datasets=("gsm8k",), output_dir=str(tmp_path), data_path="x",
                   compute_dtype="float16")
    assert mesh_config("fsdp=4,tensor=2") == sharding.MeshConfig(data=-1, fsdp=4, tensor=2)
    assert mesh_config("fsdp=-1") == sharding.MeshConfig(data=1, fsdp=-1, tensor=1)
    assert mesh_config("data=2 tensor=4") == sharding.MeshConfig(data=2, fsdp=1, tensor=4)
