"""bench/accelerator.sh: without a GPU or TPU it fails with a clear message;
with --allow-cpu it runs every phase on CPU at the toy size and writes the
JSON and the table. (The accelerator itself is measured on one, never in CI.)"""

import glob
import json
import os
import shutil
import subprocess

import pytest

from bench.accelerator import peak_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "accelerator.sh")
HAS_ACCELERATOR = bool(shutil.which("nvidia-smi") or glob.glob("/dev/accel*"))
# One parity test (PEFT's own save, imported by us): the parity phase runs, cheaply.
PARITY = "tests/test_adapters_lora.py::test_peft_saved_adapter_imports_with_same_logits[lora-gqa]"


def run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_peak_table_keys_by_device_kind():
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16("NVIDIA H200") == 989e12
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16("TPU v5 lite") == 197e12  # v5e
    assert peak_bf16("TPU v5") == 459e12  # v5p
    assert peak_bf16("TPU v4") == 275e12
    assert peak_bf16("cpu") is None


@pytest.mark.slow
@pytest.mark.skipif(HAS_ACCELERATOR, reason="this machine has an accelerator")
def test_no_accelerator_fails_clearly():
    proc = run("--out", "unused")
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: no GPU or TPU found: ")
    assert "--allow-cpu" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(HAS_ACCELERATOR, reason="this machine has an accelerator")
def test_cpu_path_runs_every_phase(tmp_path):
    proc = run("--allow-cpu", "--out", str(tmp_path), "--", "--parity", PARITY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator.json").read_text())
    assert result["tiny"] is True and result["failed"] == []
    assert result["install"].startswith("none (CPU path")
    assert result["device"]["platform"] == "cpu" and result["device"]["matmul_bf16_flops"] > 0
    assert result["parity"]["passed"] is True
    assert [r["status"] for r in result["parity"]["runs"]] == ["passed"]
    for name in ("smollm2", "llama1b"):
        t = result["train"][name]
        assert t["tokens_per_s"] > 0 and t["step_s"] > 0 and t["flops_per_s"] > 0
        assert t["mfu"] is None  # no data-sheet peak for a CPU
        assert 0 < t["of_measured_matmul_peak"]
        assert t["recompiles"] == 0 and t["trainable"] > 0
        assert t["peak_bytes_in_use"] is None and t["host_peak_rss_mb"] > 0  # CPU: no stats
    assert [r["batch"] for r in result["generate"]["rows"]] == [1, 2]
    assert all(r["tokens_per_s"] > 0 for r in result["generate"]["rows"])
    assert result["seconds"] < result["budget_s"]
    table = (tmp_path / "accelerator.md").read_text()
    assert "| LoRA train step |" in table and "| batch 1 |" in table
