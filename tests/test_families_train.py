"""`python -m train`'s loop on BLOOM, OPT, GPT-J and GPT-NeoX: sharded on 8
fake CPU devices (data x fsdp x tensor = 2 x 2 x 2) the losses equal one
device's, with LoRA on every linear layer (fused query_key_value included)
of a tiny random model with a word-level tokenizer (tests/families.py)."""

import numpy as np
import pytest

pytest.importorskip("torch")

from families import FAMILIES, make_model_dir  # noqa: E402
from test_train import cfg_for, devices, losses  # noqa: E402

from train.loop import run  # noqa: E402


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_losses_equal_one_device(tmp_path, name):
    model_dir = make_model_dir(tmp_path / "model", name)
    targets = "adapter.settings.target_modules=all-linear"
    run(cfg_for(model_dir, tmp_path / "one", targets, "mesh.data=1"), devices=devices(1))
    run(cfg_for(model_dir, tmp_path / "eight", targets, "mesh.data=2", "mesh.fsdp=2",
                "mesh.tensor=2"), devices=devices(8))
    reference = losses(tmp_path / "one")
    # Only the order of float32 reductions differs (as tests/test_train.py: ~1e-6).
    np.testing.assert_allclose(losses(tmp_path / "eight"), reference, rtol=1e-5, atol=1e-5)
    assert reference[-1] < reference[0]  # and it learns
