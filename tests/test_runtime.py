"""Process-level settings (flax_adapters/runtime.py) and the config field
that drives them: `model.matmul_precision`, resolved per backend and applied
by `python -m train`."""

from __future__ import annotations

import typing

import jax
import pytest

from flax_adapters import runtime
from train import config as config_lib


@pytest.fixture
def keep_precision():
    saved = jax.config.jax_default_matmul_precision
    yield
    jax.config.update("jax_default_matmul_precision", saved)


@pytest.mark.parametrize("value, backend, want", [
    ("auto", "cpu", "highest"), ("auto", "gpu", "default"), ("auto", "tpu", "default"),
    ("highest", "gpu", "highest"), ("high", "tpu", "high"), ("default", "cpu", "default"),
])
def test_resolve_matmul_precision(value, backend, want):
    assert runtime.resolve_matmul_precision(value, backend) == want


def test_an_unknown_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match="'bf16'.*auto, highest, high, default"):
        runtime.resolve_matmul_precision("bf16", "cpu")


def test_set_matmul_precision_applies_and_returns_it(keep_precision):
    assert runtime.set_matmul_precision("high") == "high"
    assert jax.config.jax_default_matmul_precision == "high"
    want = runtime.resolve_matmul_precision("auto", jax.default_backend())
    assert runtime.set_matmul_precision("auto") == want
    assert jax.config.jax_default_matmul_precision == want


def test_the_config_field_takes_exactly_the_runtime_values():
    hint = typing.get_type_hints(config_lib.ModelConfig)["matmul_precision"]
    assert typing.get_args(hint) == runtime.MATMUL_PRECISIONS
    assert config_lib.ModelConfig().matmul_precision == "auto"
    assert config_lib.load(None, ["model.matmul_precision=high"]).model.matmul_precision == "high"
    with pytest.raises(ValueError, match="model.matmul_precision.*'auto', 'highest', 'high', "
                                         "'default'"):
        config_lib.load(None, ["model.matmul_precision=fast"])
    assert "model.matmul_precision" in config_lib.help_text()


def test_train_applies_the_configured_precision(monkeypatch, tmp_path, keep_precision):
    """`python -m train` sets it before the run starts (the run itself stubbed)."""
    import train.loop
    from train.__main__ import main

    seen = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: False)  # not in pytest's process
    monkeypatch.setattr(train.loop, "run", lambda cfg, **kw: seen.append(
        (cfg.model.matmul_precision, jax.config.jax_default_matmul_precision)))
    assert main([f"output_dir={tmp_path / 'out'}", "model.matmul_precision=high"]) == 0
    assert main([f"output_dir={tmp_path / 'out'}"]) == 0
    assert seen == [("high", "high"),
                    ("auto", runtime.resolve_matmul_precision("auto", jax.default_backend()))]
