"""The sharded train step moves what the sharding says and no more: the
collectives of its compiled HLO on 8 devices (bench/collectives.py) against
the analytical expectation, for data, fsdp and fsdp x tensor meshes.

Without the models' activation constraints (sharding.constrain), XLA spread
the weights' fsdp-sharded 'embed' dimension into the activations and
all-reduced whole activations, the full-batch logits included: on fsdp=8
5x the expected bytes. This test fails on that."""

import dataclasses

import jax
import pytest

from bench import collectives

if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices", allow_module_level=True)

# bench/train_step.py's tiny LLaMA with 2 layers: the collectives per layer are the same
MODEL = dataclasses.replace(collectives.model_config("tiny"), num_hidden_layers=2)


@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,tensor=4"])
def test_collective_bytes_match_the_expectation(mesh):
    _, r = collectives.measure(MODEL, "lora", mesh, batch=16, seq=64)
    assert r["expected"] > 0
    assert 0.97 <= r["measured"] / r["expected"] <= 1.1, (r["bytes"], r["expected"])
    assert r["small"] < 16 * 1024  # scalars only: loss, token count, gradient norm
    assert r["loops"] == 0


def test_collectives_are_parsed():
    hlo = """HloModule m

ENTRY %main (p: f32[4,8]) -> f32[16,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %ag = f32[16,8]{1,0} all-gather(%p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[1,8]{1,0} reduce-scatter(%p), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  %ar = (f32[16,8]{1,0}, bf16[2]{0}) all-reduce(%ag, %b), channel_id=3, to_apply=%add
  ROOT %ar2 = f32[2]{0} all-reduce-start(%c), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
}
"""
    found = collectives.collectives(hlo)
    assert [(c["op"], c["bytes"], c["group"]) for c in found] == [
        ("all-gather", 16 * 8 * 4, 4), ("reduce-scatter", 1 * 8 * 4 * 4, 4),
        ("all-reduce", 16 * 8 * 4 + 2 * 2, None), ("all-reduce", 8, 4)]
