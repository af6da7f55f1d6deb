"""Fuzz: hundreds of malformed configs, command lines, data files, model files
and training checkpoints, from generated tables (seeded, so a failure names
a case that can be rerun).

Each bad input must end in ONE clear line: an exception the CLI turns into
`error: ...` (ValueError, OSError, TrainingError) whose message is one line
and names what was wrong; anything else (KeyError, ZeroDivisionError, a
traceback) fails the test. Nothing may be left behind: no output directory
for a config that was refused, no change to the model directory read, and a
damaged training checkpoint is set aside while the good one before it
restores bit for bit. Readers of model files must fail before allocating
anything like what a corrupted size field claims.

Almost everything runs in-process (config_lib / main() / prepare /
load_pretrained / Checkpointer); a handful of cases run the real CLI.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import pathlib
import random
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_adapters.checkpoints import load_pretrained
from train import config as config_lib
from train import data as data_lib
from train.checkpoint import Checkpointer, CorruptCheckpoint
from train.loop import TrainingError

USER_ERRORS = (ValueError, OSError, TrainingError)
# orbax leaves coroutines un-awaited when a damaged checkpoint fails to read; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
TESTS = pathlib.Path(__file__).resolve().parent


def clear_error(fn, *args, **kwargs) -> str:
    """Runs fn, which must raise a user error with a one-line message; returns it."""
    try:
        fn(*args, **kwargs)
    except USER_ERRORS as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg and "Traceback" not in msg, repr(msg)
        assert len(msg) < 1200, msg
        return msg
    raise AssertionError(f"{fn.__name__}{args} raised nothing")


def tree_of(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}

# ------------------------------------------------------------------- configs + CLI


def _leaf_fields(cls=config_lib.TrainConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.metadata.get("bounds", {})


def _bad_values(tp, bounds) -> list:
    """Values of the wrong type for `tp`, and just outside its bounds."""
    if tp is bool:
        return ["maybe", 2, [True]]
    if tp is int:
        out = ["abc", 1.5, True, [1], {"a": 1}, "", None]
    elif tp is float:
        out = ["abc", True, [1.0], {"a": 1}, ".nan", ".inf", "-.inf", "1e999"]
    elif typing.get_origin(tp) is typing.Literal:
        return ["no-such-choice", 3, [typing.get_args(tp)[0]]]
    elif tp is str:
        return [5, [1], {"a": 1}]
    elif tp is dict:
        return [5, "x", [1]]
    else:
        return []
    if "ge" in bounds:
        out += [bounds["ge"] - 1, -10**9]
    if "gt" in bounds:
        out += [bounds["gt"], -1.0]
    if "lt" in bounds:
        out += [bounds["lt"], 10.0]
    return out


def _as_yaml(value) -> str:
    # JSON is YAML flow syntax; YAML spellings (.nan, 1e999) are passed raw.
    if isinstance(value, str) and value.startswith((".", "-.", "1e")):
        return value
    return json.dumps(value)


CONFIG_CASES = [(f"{name}={_as_yaml(v)}", name) for name, tp, bounds in _leaf_fields()
                for v in _bad_values(tp, bounds)]
CONFIG_CASES += [(f"mesh.{axis}={v}", f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")
                 for v in ("0", "-2", "abc", "1.5")]
CONFIG_CASES += [(f"adapter.settings.{k}", "adapter.settings") for k in (
    "r=0", "r=-3", "r=abc", "alpha=abc", "dropout=1.5", "dropout=-0.1", "init=bogus",
    "target_modules=5", "rank=4", "use_rslora=maybe")]
CONFIG_CASES += [(o, key) for o, key in [
    ("adapter.method=lora2", "adapter.method"),
    ("model=5", "model"), ("optim=[1, 2]", "optim"), ("data=abc", "data"),
    ("nosuchsection.x=1", "nosuchsection"), ("optim.lrr=1", "optim.lrr"),
    ("model.path.x=1", "model.path"), ("steps.x=1", "steps"),
    ("batch_size=10", "batch_size"), ("micro_batch_size=3", "micro_batch_size"),
]]
# Command-line syntax: (argv, what the message must mention).
CLI_CASES = [
    (["steps"], "steps"), (["=5"], "=5"), (["a..b=1"], "a..b"), ([".steps=1"], ".steps"),
    (["steps=[1"], "steps=[1"), (["optim.lr={a: [}"], "optim.lr"),
    (["optim.lr=!!python/object/apply:os.system [touch PWNED]"], "optim.lr"),
    (["data.path=!!binary aGk="], "data.path"), (["steps=&a 1", "seed=*b"], "seed=*b"),
    (["--config", "missing.yaml"], "missing.yaml"),
]
# name -> (file bytes, what the message must mention; FILE = the file's path)
FILE = object()
YAML_FILES = {
    "not_yaml": (b"model: [unclosed\n", FILE),
    "tabs": (b"model:\n\tpath: x\n", FILE),
    "list": (b"- model\n- adapter\n", FILE),
    "scalar": (b"42\n", FILE),
    "binary": (bytes(range(256)), FILE),
    "latin1": ("model:\n  path: caf\xe9\n".encode("latin-1"), FILE),
    "python_tag": (b"steps: !!python/object/apply:os.system ['touch PWNED']\n", FILE),
    "deep": (b"[" * 5000 + b"]" * 5000, FILE),
    "unknown_section": (b"modle:\n  path: default\n", "did you mean model"),
    "section_scalar": (b"optim: 3\n", "optim"),
    "section_list": (b"data: [1, 2]\n", "data"),
    "wrong_type": (b"steps: many\n", "steps"),
    "alias_bomb": (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a]\n"
                   b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c]\n",
                   "unknown key a"),
    "duplicate_nested": (b"optim:\n  lr: 1e-3\n  lr: x\n", "optim.lr"),
    "empty_key": (b"'': 1\n", "unknown key"),
}


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """Runs `python -m train` in-process (train.__main__.main); returns
    (exit status, stderr) and checks nothing was written."""
    from train.__main__ import main

    monkeypatch.chdir(tmp_path)  # a PWNED file would appear here
    out = tmp_path / "out"

    def go(argv):
        rc = main([f"output_dir={out}", *argv])
        captured = capsys.readouterr()
        assert not out.exists(), "a refused run left an output directory"
        assert not (tmp_path / "PWNED").exists(), "YAML ran code"
        return rc, captured.err
    return go


def check_cli_error(rc, err, mention):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert mention.lower() in lines[0].lower(), (mention, lines[0])


@pytest.mark.parametrize("override, mention", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_override(cli, override, mention):
    check_cli_error(*cli([override]), mention)


@pytest.mark.parametrize("argv, mention", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_command_line(cli, argv, mention):
    check_cli_error(*cli(argv), mention)


@pytest.mark.parametrize("name", sorted(YAML_FILES))
def test_bad_config_file(cli, tmp_path, name):
    f = tmp_path / f"{name}.yaml"
    content, mention = YAML_FILES[name]
    f.write_bytes(content)
    check_cli_error(*cli(["--config", str(f)]), str(f) if mention is FILE else mention)


NOT_SMALL_FILES = ["directory", "dev_zero", "huge"]


@pytest.mark.parametrize("make", NOT_SMALL_FILES)
def test_config_that_is_not_a_small_file(cli, tmp_path, make):
    f = {"directory": tmp_path, "dev_zero": pathlib.Path("/dev/zero"),
         "huge": tmp_path / "huge.yaml"}[make]
    if make == "huge":
        f.write_bytes(b"# padding\n" * 200_000)
    check_cli_error(*cli(["--config", str(f)]), str(f))


def test_unknown_flag_is_argparse_usage_error(cli):
    with pytest.raises(SystemExit) as e:
        cli(["--bogus"])
    assert e.value.code == 2

# ------------------------------------------------------------------------------ data


GOOD = {"instruction": "Add 1 and 2.", "input": "", "output": "1 + 2 = 3. The answer is 3.",
        "answer": "3"}


def _record_cases():
    cases = {}
    for key in ("instruction", "output"):
        for name, v in (("null", None), ("int", 5), ("float", 1.5), ("bool", True),
                        ("list", ["a"]), ("empty_list", []), ("object", {"a": "b"})):
            cases[f"{key}_{name}"] = {**GOOD, key: v}
        cases[f"{key}_missing"] = {k: v for k, v in GOOD.items() if k != key}
    for name, v in (("int", 5), ("list", ["x"]), ("object", {"a": 1}), ("bool", True)):
        cases[f"input_{name}"] = {**GOOD, "input": v}
    for name, v in (("int", 5), ("string", "a record"), ("list", [GOOD]), ("null", None),
                    ("empty_object", {})):
        cases[f"record_{name}"] = v
    return cases


RECORD_CASES = _record_cases()


def _file_cases():
    good = json.dumps([GOOD] * 30).encode()
    cases = {f"cut_at_{k}": good[:k] for k in (1, 2, 17, len(good) // 3, len(good) - 1)}
    rng = random.Random(0)
    cases.update({f"random_bytes_{i}": bytes(rng.randrange(256) for _ in range(300))
                  for i in range(3)})
    cases.update({
        "empty": b"", "whitespace": b" \n\t\n", "null": b"null", "number": b"42",
        "string": b'"records"', "empty_list": b"[]", "object": json.dumps(GOOD).encode(),
        "object_of_lists": json.dumps({"data": [GOOD]}).encode(),
        "list_of_lists": json.dumps([[GOOD]]).encode(), "list_of_strings": b'["a", "b"]',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "utf16": json.dumps([GOOD]).encode("utf-16"),
        "bad_utf8": json.dumps([GOOD]).encode().replace(b"Add", b"\xff\xfedd"),
        "jsonl_bad_line": b"\n".join([json.dumps(GOOD).encode()] * 3 + [b"{oops"]),
        "mixed_types": json.dumps([GOOD, {**GOOD, "output": 3}]).encode(),
        "nan": b'[{"instruction": NaN, "output": "x"}]',
    })
    return cases


FILE_CASES = _file_cases()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(TESTS))
    from tiny import make_tokenizer
    return make_tokenizer()


def _prepare(path, tokenizer):
    cfg = config_lib.from_dict(config_lib.DataConfig, {"path": str(path), "val_set_size": 4})
    return data_lib.prepare(cfg, tokenizer, batch_size=4, seed=0)


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_bad_record(tmp_path, tokenizer, case):
    records = [GOOD] * 20
    records[7] = RECORD_CASES[case]
    f = tmp_path / "data.json"
    f.write_text(json.dumps(records))
    assert str(f) in clear_error(_prepare, f, tokenizer)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_data_file(tmp_path, tokenizer, case):
    f = tmp_path / ("data.jsonl" if "jsonl" in case else "data.json")
    f.write_bytes(FILE_CASES[case])
    assert str(f) in clear_error(_prepare, f, tokenizer)


DATA_PATH_CASES = ["missing", "directory", "embedded_typo"]


@pytest.mark.parametrize("case", DATA_PATH_CASES)
def test_bad_data_path(tmp_path, tokenizer, case):
    path = {"missing": tmp_path / "nope.json", "directory": tmp_path / "dir.json",
            "embedded_typo": "embedded:arithmetic"}[case]
    if case == "directory":
        path.mkdir()
    assert str(path) in clear_error(_prepare, path, tokenizer)

# ----------------------------------------------------------------- model files


def _write_tiny(directory):
    sys.path.insert(0, str(TESTS))
    from test_loading import write_tiny
    return write_tiny(directory)


def _st_header(data: bytes) -> tuple[dict, int]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), n


def _with_header(data: bytes, header: dict | list | str) -> bytes:
    old_n = int.from_bytes(data[:8], "little")
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + old_n:]


NORM = "model.norm.weight"


def _safetensors_cases():
    """name -> function(bytes) -> bytes of a corrupted model.safetensors."""
    def entry(change):
        def f(data):
            h, _ = _st_header(data)
            change(h)
            return _with_header(data, h)
        return f

    def set_field(field, value):
        return entry(lambda h: h[NORM].__setitem__(field, value))

    cases = {}
    for k in (0, 4, 7, 8, 9, 64, "header_end", "header_end+1", "mid_data", "last_byte"):
        def cut(data, k=k):
            n = int.from_bytes(data[:8], "little")
            at = {"header_end": 8 + n, "header_end+1": 9 + n, "mid_data": (8 + n + len(data)) // 2,
                  "last_byte": len(data) - 1}.get(k, k)
            return data[:at]
        cases[f"cut_at_{k}"] = cut
    for n in (0, 1, 2**63, 2**64 - 1, 10**8):
        cases[f"header_len_{n}"] = lambda data, n=n: n.to_bytes(8, "little") + data[8:]
    cases["header_len_file_size"] = lambda data: len(data).to_bytes(8, "little") + data[8:]
    for name, v in (("F8", "F8"), ("empty", ""), ("int", 5), ("null", None), ("I64", "I64"),
                    ("I32", "I32"),
                    ("BOOL", "BOOL"), ("U8", "U8"), ("lower", "f32"), ("list", ["F32"])):
        cases[f"dtype_{name}"] = set_field("dtype", v)
    for name, v in (("scalar", []), ("negative", [-1, 16]), ("huge", [2**40, 2**40]),
                    ("string_dim", ["a"]), ("string", "16"), ("float_dim", [16.0]),
                    ("bool_dim", [True] * 16), ("null", None), ("too_many", [16, 1, 1, 2]),
                    ("object", {"0": 16})):
        cases[f"shape_{name}"] = set_field("shape", v)
    for name, v in (("one", [0]), ("reversed", [64, 0]), ("negative", [-64, 0]),
                    ("huge", [0, 2**62]), ("strings", ["0", "64"]), ("floats", [0.0, 64.0]),
                    ("null", None), ("three", [0, 32, 64]), ("short", [0, 32]),
                    ("overlap", [0, 64]), ("past_end", [10**9, 10**9 + 64])):
        cases[f"offsets_{name}"] = set_field("data_offsets", v)
    cases["entry_list"] = entry(lambda h: h.__setitem__(NORM, [1, 2]))
    cases["entry_null"] = entry(lambda h: h.__setitem__(NORM, None))
    cases["entry_missing_dtype"] = entry(lambda h: h[NORM].pop("dtype"))
    cases["header_list"] = lambda data: _with_header(data, [1, 2])
    cases["header_string"] = lambda data: _with_header(data, "tensors")
    cases["header_not_utf8"] = lambda data: data[:8] + b"\xff" + data[9:]
    cases["header_garbage"] = lambda data: data[:9] + b"\x00" * 40 + data[49:]

    def duplicate(data):
        h, n = _st_header(data)
        raw = json.dumps(h)[:-1] + ', "%s": %s}' % (NORM, json.dumps(h[NORM]))
        raw = raw.encode()
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    cases["duplicate_name"] = duplicate

    def nan_weight(data):
        h, n = _st_header(data)
        start = 8 + n + h[NORM]["data_offsets"][0]
        return data[:start] + struct.pack("<f", float("nan")) + data[start + 4:]
    cases["nan_weight"] = nan_weight
    cases["inf_weight"] = lambda data: nan_weight(data).replace(
        struct.pack("<f", float("nan")), struct.pack("<f", float("inf")), 1)
    cases["trailing_bytes"] = lambda data: data + b"\x00" * 16
    cases["path_name"] = entry(lambda h: h.__setitem__("../../etc/passwd", h.pop(NORM)))
    return cases


ST_CASES = _safetensors_cases()


def _config_cases():
    cases = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        cases[f"{key}_missing"] = ("drop", key)
        for name, v in (("zero", 0), ("negative", -4), ("string", "16"), ("float", 16.5),
                        ("bool", True), ("null", None), ("huge", 2**40)):
            cases[f"{key}_{name}"] = ("set", key, v)
    for key, v in (("num_key_value_heads", 0), ("num_key_value_heads", 3),
                   ("num_key_value_heads", "1"), ("head_dim", -8), ("head_dim", 2.5),
                   ("max_position_embeddings", 0), ("rms_norm_eps", "x"), ("rms_norm_eps", -1),
                   ("rope_theta", 0), ("rope_scaling", "linear"),
                   ("rope_scaling", {"rope_type": "yarn", "factor": 2}),
                   ("rope_scaling", {"rope_type": "linear"}), ("model_type", "gpt2"),
                   ("model_type", None), ("hidden_act", "gelu"), ("hidden_size", 24)):
        cases[f"{key}_{v!r}"] = ("set", key, v)
    cases["not_json"] = ("raw", b'{"model_type": "llama",')
    cases["list"] = ("raw", b"[1, 2]")
    cases["not_utf8"] = ("raw", b'{"model_type": "\xff"}')
    cases["empty"] = ("raw", b"")
    cases["deep"] = ("raw", b"[" * 100_000 + b"]" * 100_000)
    return cases


HF_CONFIG_CASES = _config_cases()


def _check_load_fails(directory, max_bytes=64 * 2**20) -> str:
    before = tree_of(directory) if directory.is_dir() else None
    tracemalloc.start()
    try:
        msg = clear_error(load_pretrained, directory)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < max_bytes, f"{peak} bytes allocated before failing"
    if before is not None:
        assert tree_of(directory) == before, "loading changed the model directory"
    return msg


@pytest.mark.parametrize("case", sorted(ST_CASES))
def test_corrupted_safetensors(tmp_path, case):
    d = _write_tiny(tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(ST_CASES[case](f.read_bytes()))
    _check_load_fails(d)


@pytest.mark.parametrize("case", sorted(HF_CONFIG_CASES))
def test_bad_config_json(tmp_path, case):
    d = _write_tiny(tmp_path / "m")
    spec = HF_CONFIG_CASES[case]
    cfg = json.loads((d / "config.json").read_text())
    if spec[0] == "raw":
        (d / "config.json").write_bytes(spec[1])
    else:
        if spec[0] == "drop":
            cfg.pop(spec[1])
        else:
            cfg[spec[1]] = spec[2]
        (d / "config.json").write_text(json.dumps(cfg))
    assert "config.json" in _check_load_fails(d)


SHARD_INDEX_CASES = ["index_not_json", "index_no_map", "index_list", "index_path_escape",
                     "index_absolute", "index_nonstring"]


@pytest.mark.parametrize("case", SHARD_INDEX_CASES)
def test_bad_shard_index(tmp_path, case):
    d = _write_tiny(tmp_path / "m")
    index = d / "model.safetensors.index.json"
    index.write_text({
        "index_not_json": "{", "index_no_map": "{}", "index_list": "[]",
        "index_path_escape": json.dumps({"weight_map": {NORM: "../m/model.safetensors"}}),
        "index_absolute": json.dumps({"weight_map": {NORM: str(d / "model.safetensors")}}),
        "index_nonstring": json.dumps({"weight_map": {NORM: 5}}),
    }[case])
    assert "index.json" in _check_load_fails(d)


TOKENIZER_CASES = ["truncated", "garbage", "not_json", "empty"]


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_corrupted_tokenizer(tmp_path, tokenizer, case):
    d = _write_tiny(tmp_path / "m")
    tokenizer.save_pretrained(d)
    load_pretrained(d)  # intact, it loads (and transformers' imports are not counted below)
    f = d / "tokenizer.json"
    f.write_bytes({"truncated": f.read_bytes()[:200], "garbage": bytes(range(256)) * 4,
                   "not_json": b'{"version": "1.0", "model": 5}', "empty": b""}[case])
    assert "tokenizer" in _check_load_fails(d)

# ------------------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(TESTS))
    from test_gguf import TINY, random_state, tiny_byte_level_vocab, write_gguf
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, TINY, random_state(TINY), more=tiny_byte_level_vocab())
    return path


def _gguf_layout(path) -> dict:
    """Byte offsets of the fields a corruption targets, read with gguf-py."""
    import gguf
    from numpy.lib.array_utils import byte_bounds
    reader = gguf.GGUFReader(path)
    base = byte_bounds(reader.data)[0]

    def at(part):
        return byte_bounds(part)[0] - base
    fields = reader.fields
    t = reader.tensors[1]
    name_len, _, n_dims, dims, ttype, offset = t.field.parts
    return {"tensor_count": at(fields["GGUF.tensor_count"].parts[0]),
            "kv_count": at(fields["GGUF.kv_count"].parts[0]),
            "key_len": at(fields["general.architecture"].parts[0]),
            "value_type": at(fields["general.architecture"].parts[2]),
            "value_len": at(fields["general.architecture"].parts[3]),
            "block_count": at(fields["llama.block_count"].parts[-1]),
            "head_count": at(fields["llama.attention.head_count"].parts[-1]),
            "tokens_len": at(fields["tokenizer.ggml.tokens"].parts[3]),
            "eos_id": at(fields["tokenizer.ggml.eos_token_id"].parts[-1]),
            "tensor_name_len": at(name_len), "n_dims": at(n_dims), "dim0": at(dims),
            "tensor_type": at(ttype), "tensor_offset": at(offset),
            "data_start": reader.data_offset, "size": len(reader.data)}


GGUF_TARGETED = [  # (field, struct format, value)
    ("tensor_count", "<Q", 2**40), ("tensor_count", "<Q", 2**63), ("tensor_count", "<Q", 0),
    ("kv_count", "<Q", 2**40), ("kv_count", "<Q", 0), ("key_len", "<Q", 2**60),
    ("key_len", "<Q", 0), ("value_type", "<I", 99), ("value_len", "<Q", 2**60),
    ("block_count", "<I", 0), ("block_count", "<I", 2**31), ("head_count", "<I", 0),
    ("head_count", "<I", 7), ("tokens_len", "<Q", 2**40), ("eos_id", "<I", 10**6),
    ("tensor_name_len", "<Q", 2**50), ("n_dims", "<I", 0), ("n_dims", "<I", 5),
    ("n_dims", "<I", 2**31), ("dim0", "<Q", 2**40), ("dim0", "<Q", 0), ("dim0", "<Q", 1),
    ("tensor_type", "<I", 99), ("tensor_type", "<I", 255), ("tensor_offset", "<Q", 2**60),
    ("tensor_offset", "<Q", 1), ("tensor_offset", "<Q", 2**20),
]


def _load_gguf_or_fail(path, max_bytes=32 * 2**20) -> None:
    """A corrupted GGUF either fails with a clear error or, if the damage hit
    bytes that change only weight values, loads (GGUF has no checksum);
    nothing else. Peak memory stays near the file's size."""
    tracemalloc.start()
    try:
        try:
            load_pretrained(path)
        except USER_ERRORS as e:
            assert str(e).strip() and "\n" not in str(e), repr(str(e))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < max_bytes, f"{peak} bytes allocated"


@pytest.mark.parametrize("field, fmt, value", GGUF_TARGETED,
                         ids=[f"{f}={v}" for f, _, v in GGUF_TARGETED])
def test_gguf_absurd_field(tmp_path, gguf_file, field, fmt, value):
    data = bytearray(gguf_file.read_bytes())
    at = _gguf_layout(gguf_file)[field]
    struct.pack_into(fmt, data, at, value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    _check_load_fails(path, max_bytes=32 * 2**20)


GGUF_CUTS = ["4", "8", "24", "key_len", "tensor_type", "data_start", "data_start+100", "size-1"]


@pytest.mark.parametrize("cut", GGUF_CUTS)
def test_gguf_truncated(tmp_path, gguf_file, cut):
    layout = _gguf_layout(gguf_file)
    name, _, plus = cut.partition("+")
    name, _, minus = name.partition("-")
    at = (int(name) if name.isdigit() else layout[name]) + int(plus or 0) - int(minus or 0)
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_file.read_bytes()[:at])
    _check_load_fails(path)


GGUF_DAMAGE_SEEDS = range(24)


@pytest.mark.parametrize("seed", GGUF_DAMAGE_SEEDS)
def test_gguf_random_header_damage(tmp_path, gguf_file, seed):
    """Random bytes of the header (metadata + tensor infos) overwritten."""
    rng = random.Random(seed)
    data = bytearray(gguf_file.read_bytes())
    end = _gguf_layout(gguf_file)["data_start"]
    for _ in range(rng.choice((1, 4, 16))):
        data[rng.randrange(4, end)] = rng.randrange(256)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    _load_gguf_or_fail(path)

# ------------------------------------------------------------ training checkpoints


def _state(offset: float):
    return {"step": jnp.int32(int(offset)),
            "trainable": {"a": jnp.arange(300, dtype=jnp.float32) * 0.5 + offset,
                          "b": jnp.full((4, 8), offset, jnp.bfloat16)},
            "opt": {"count": jnp.int32(7), "ok": jnp.bool_(True)}}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Checkpoints of steps 1 and 2 (different states), written once."""
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ck = Checkpointer(root, keep=5)
    for step in (1, 2):
        ck.save(step, _state(step), {"step": step, "config": {"seed": 0}})
    ck.close()
    return root


def _orbax_files(root):
    return sorted(str(p.relative_to(root / "2")) for p in (root / "2").rglob("*")
                  if p.is_file())


CORRUPTIONS = ["trunc", "flip", "delete"]


ORBAX_DIR_CASES = ["empty_step_dir", "no_state_dir", "no_meta_dir", "state_is_file",
                   "step_is_file", "swapped_meta"]


def _restore_checks(root, caplog):
    """The newest checkpoint that is intact restores bit for bit; a damaged
    step 2 is set aside with a warning and step 1 restores instead."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        ck = Checkpointer(root, keep=5)
        step, state, meta = ck.restore_latest(_state(0))
        ck.close()
    want = _state(step)
    for got, exp in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
    assert meta["step"] == step
    if step == 1:
        assert (root / "2.corrupt").exists() and "moved to 2.corrupt" in caplog.text
    gc.collect()  # orbax's un-awaited coroutines are reported here, under the filter above
    return step


def test_orbax_file_list_is_what_the_fuzz_covers(saved_run):
    assert len(_orbax_files(saved_run)) >= 10


@pytest.mark.parametrize("mode", CORRUPTIONS)
def test_corrupted_training_checkpoint(tmp_path, saved_run, caplog, mode):
    """Every file of the newest checkpoint damaged in turn (one case each)."""
    fell_back = []
    for i, name in enumerate(_orbax_files(saved_run)):
        root = tmp_path / str(i) / "checkpoints"
        shutil.copytree(saved_run, root)
        f = root / "2" / name
        data = f.read_bytes()
        if mode == "trunc":
            f.write_bytes(data[:len(data) // 2])
        elif mode == "flip":
            b = bytearray(data)
            b[len(b) // 2] ^= 0x10
            f.write_bytes(bytes(b))
        else:
            f.unlink()
        if _restore_checks(root, caplog) == 1:
            fell_back.append(name)
    # The array data and the metadata orbax needs are among what was damaged.
    assert any("/d/" in n for n in fell_back) and "meta/metadata" in fell_back, fell_back


@pytest.mark.parametrize("case", ORBAX_DIR_CASES)
def test_damaged_checkpoint_directory(tmp_path, saved_run, caplog, case):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved_run, root)
    step2 = root / "2"
    if case == "empty_step_dir":
        shutil.rmtree(step2)
        step2.mkdir()
    elif case == "no_state_dir":
        shutil.rmtree(step2 / "state")
    elif case == "no_meta_dir":
        shutil.rmtree(step2 / "meta")
    elif case == "state_is_file":
        shutil.rmtree(step2 / "state")
        (step2 / "state").write_text("x")
    elif case == "step_is_file":
        shutil.rmtree(step2)
        step2.write_text("x")
    elif case == "swapped_meta":  # a valid meta of another step: digest passes, fingerprint not
        shutil.rmtree(step2 / "meta")
        shutil.copytree(root / "1" / "meta", step2 / "meta")
    assert _restore_checks(root, caplog) == 1


def test_all_checkpoints_corrupt_is_one_clear_error(tmp_path, saved_run):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved_run, root)
    for step in ("1", "2"):
        (root / step / "meta" / "metadata").write_text("{")
    ck = Checkpointer(root, keep=5)
    msg = clear_error(ck.restore_latest, _state(0))
    assert "no checkpoint" in msg and "--overwrite" in msg
    assert sorted(p.name for p in root.iterdir()) == ["1.corrupt", "2.corrupt"]


def test_refused_meta_moves_nothing(tmp_path, saved_run):
    """A checkpoint refused by check_meta (e.g. another config) is not corrupt."""
    root = tmp_path / "checkpoints"
    shutil.copytree(saved_run, root)

    def refuse(meta):
        raise TrainingError(f"written under another config (step {meta['step']})")
    ck = Checkpointer(root, keep=5)
    assert "step 2" in clear_error(ck.restore_latest, _state(0), refuse)
    assert sorted(p.name for p in root.iterdir()) == ["1", "2"]


def test_incomplete_save_is_reported_and_removed(tmp_path, saved_run, caplog):
    root = tmp_path / "checkpoints"
    shutil.copytree(saved_run, root)
    shutil.copytree(root / "2", root / "3.orbax-checkpoint-tmp")
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        ck = Checkpointer(root, keep=5)
        assert ck.latest_step() == 2
        ck.save(3, _state(3), {"step": 3})
    assert "3.orbax-checkpoint-tmp" in caplog.text and "incomplete" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "3"]
    assert ck.restore(3, _state(0))[1]["step"] == 3

# ------------------------------------------------------------------------ real CLI


@pytest.mark.slow
def test_cli_subprocess_cases(tmp_path):
    """A few of the above through the real `python -m train`, in parallel: the
    status, one `error:` line on stderr, no traceback, no output directory."""
    pytest.importorskip("torch")
    from tiny import make_model_dir

    model = make_model_dir(tmp_path / "model")
    tiny_run = [f"model.path={model}", "batch_size=8", "micro_batch_size=8", "eval_generate=0",
                "data.embedded_train_size=100", "data.val_set_size=8", "checkpoint_every=1"]
    cases = {  # name -> (argv, status, text the error line must hold)
        "nan_lr": (["optim.lr=.nan"], 2, "optim.lr"),
        "bad_yaml": (["steps=[1"], 2, "steps=[1"),
        "dev_zero": (["--config", "/dev/zero"], 2, "/dev/zero"),
        "yaml_code": (["seed=!!python/object/apply:os.system [touch PWNED]"], 2, "seed"),
        "no_model": (["model.path=/nonexistent/model"], 1, "/nonexistent/model"),
        "bad_data": ([f"model.path={model}", f"data.path={tmp_path / 'nope.json'}"], 1,
                     "nope.json"),
        # A run that diverges (see test_reliability.DIVERGE): status 1, the
        # policy's message, the checkpoints of the good steps kept.
        "diverges": ([*tiny_run, "steps=6", "optim.lr=1e30", "optim.warmup_steps=1",
                      "optim.nonfinite=stop"], 1,
                     "error: non-finite loss or gradient at step 3 (optim.nonfinite=stop)"),
    }
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "train", *argv, f"output_dir={tmp_path / name}"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(TESTS.parent)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for name, (argv, _, _) in cases.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=600)
        argv, status, mention = cases[name]
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert p.returncode == status, (name, err[-2000:])
        assert len(lines) == 1 and mention in lines[0] and "Traceback" not in err, (name, err)
        assert err.strip().splitlines()[-1] == lines[0], (name, err[-2000:])
        if name == "diverges":
            assert sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir()) == \
                ["1", "2"]
        else:
            assert not (tmp_path / name).exists(), name
    assert not (tmp_path / "PWNED").exists()


def test_the_fuzz_covers_the_600_inputs_the_readme_counts(saved_run):
    """README.md: "tests/test_fuzz.py holds the generated tables, 600+ cases".
    The distinct bad inputs the tests above feed, from the same lists they are
    parametrized by (618 or 621 on 2026-12-04: an orbax checkpoint has 15 or 16
    files, its number of ocdbt data files varies). The subprocess cases repeat
    in-process ones and are not counted. A table cut down (or a count that
    reads the wrong list) falls below 600."""
    n_files = len(_orbax_files(saved_run))
    n = (len(CONFIG_CASES) + len(CLI_CASES) + len(YAML_FILES) + len(NOT_SMALL_FILES)
         + 1  # test_unknown_flag_is_argparse_usage_error
         + len(RECORD_CASES) + len(FILE_CASES) + len(DATA_PATH_CASES)
         + len(ST_CASES) + len(HF_CONFIG_CASES) + len(SHARD_INDEX_CASES) + len(TOKENIZER_CASES)
         + len(GGUF_TARGETED) + len(GGUF_CUTS) + len(GGUF_DAMAGE_SEEDS)
         + n_files * len(CORRUPTIONS)  # test_corrupted_training_checkpoint: each file, each mode
         + len(ORBAX_DIR_CASES)
         + 3)  # all checkpoints corrupt, refused meta, incomplete save
    readme = (TESTS.parent / "README.md").read_text()
    assert re.search(r"`tests/test_fuzz\.py` holds the generated tables, 600\+ cases", readme)
    assert n >= 600, n
