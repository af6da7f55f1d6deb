"""What a run leaves for a person: the exported adapter, a loss-curve PNG,
summary.json, and report.md with a before/after table."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

import flax_adapters as fa
from flax_adapters.checkpoints.atomic import write_text_atomically


def export_adapter(tree: dict, setup: Any, out_dir: pathlib.Path, base: str) -> pathlib.Path:
    """The adapter in its method's format (fa.save_adapter: PEFT, LLM-Adapters'
    BOTTLENECK, or for full fine-tuning a Hugging Face model directory with the
    base's config.json and tokenizer), written beside and renamed into place."""
    return fa.save_adapter(tree, setup.adapter_cfg, out_dir, setup.model_type,
                           base_model_name_or_path=base, hf_config=setup.hf_config,
                           tokenizer=setup.tokenizer)


def plot_losses(metrics_path: pathlib.Path, png: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def write_heldout(out: pathlib.Path, name: str, res: dict) -> None:
    """heldout_{name}.jsonl: one scored generation per line. Written as soon as
    it is known, so a resumed run reports the accuracy before training too."""
    if jax.process_index() == 0:
        write_text_atomically(out / f"heldout_{name}.jsonl",
                              "".join(json.dumps(ex) + "\n" for ex in res["examples"]))


def read_heldout(out: pathlib.Path, name: str) -> dict | None:
    """What `write_heldout` wrote, as `heldout_accuracy` returned it; None if absent."""
    path = out / f"heldout_{name}.jsonl"
    if not path.exists():
        return None
    examples = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    correct = sum(ex["correct"] for ex in examples)
    return {"n": len(examples), "correct": correct,
            "accuracy": correct / len(examples) if examples else float("nan"),
            "examples": examples}


def write_report(out: pathlib.Path, cfg: Any, setup: Any, final_tree: dict,
                 before: dict | None, after: dict | None, last: dict) -> dict:
    summary: dict = {"output_dir": str(out), "steps": cfg.steps, "final": last,
                     "adapter": cfg.adapter.method, "data": cfg.data.path}
    if jax.process_index() != 0:
        return summary
    base = cfg.model.path
    name = "model" if fa.METHODS[cfg.adapter.method].trains_base else "adapter"
    adapter_dir = export_adapter(final_tree, setup, out / name, base)
    summary["adapter_dir"] = str(adapter_dir)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    lines = ["| | held-out accuracy | n |", "|---|---|---|"]
    for name, res in (("before", before), ("after", after)):
        if res is not None:
            summary[f"accuracy_{name}"] = res["accuracy"]
            lines.append(f"| {name} fine-tuning | {100 * res['accuracy']:.1f}% | {res['n']} |")
            write_heldout(out, name, res)
    table = "\n".join(lines)
    skipped = last.get("skipped", 0)
    summary["nonfinite_skipped"] = skipped
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomically(out / "report.md", (
        f"# Run {out}\n\nAdapter: {cfg.adapter.method}; data: {cfg.data.path}; steps: "
        f"{cfg.steps}; final loss {last.get('loss', float('nan')):.4f}"
        f"{'; validation loss %.4f' % last['val_loss'] if 'val_loss' in last else ''}"
        f"{'; %d update(s) skipped for a non-finite loss or gradient' % skipped if skipped else ''}"
        f"\n\n{table}\n\n![loss](loss.png)\n\nExported adapter: `{adapter_dir}`\n"))
    print("\n" + table + "\n")
    return summary
