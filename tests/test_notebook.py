"""notebooks/quickstart.ipynb runs from top to bottom (nbclient, a fresh
kernel) on its cut-down setting: QUICKSTART_TINY=1 and a tiny random model,
and leaves the run's report, loss curve and PEFT adapter behind."""

import json
import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("torch")
    from tiny import make_model_dir

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
    env.update(QUICKSTART_TINY="1", QUICKSTART_MODEL=str(make_model_dir(tmp_path / "model")),
               QUICKSTART_OUTPUT_DIR=str(out))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError on the first failing cell

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert (out / "loss.png").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in outputs)  # the loss plot was shown
