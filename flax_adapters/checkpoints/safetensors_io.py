"""A small, defensive reader of the safetensors format, with no PyTorch.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian
header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`, then
the raw tensor bytes. We parse it ourselves rather than through
`safetensors.numpy` because that refuses bfloat16, and so that every bad
file ends in a one-line error before any large allocation: header sizes,
offsets and shapes are checked against the file size first, and tensors are
memory-mapped, never read whole. As the reference's `validate`, the tensors
must tile the data exactly (no overlap, no gap), and a name given twice in
the header is refused (JSON readers disagree on which one wins).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsError(ValueError):
    pass


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Returns ({name: {dtype, shape, data_offsets}}, byte offset of the data)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes); "
                                   "the file is truncated or empty -- download it again")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit the file "
                                   f"({size} bytes); the file is truncated or corrupted")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e}); "
                                   "the file is corrupted") from None
        except _Duplicate as e:
            raise SafetensorsError(f"{path}: the header names {e} twice; the file is "
                                   "corrupted or crafted") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object; the file is corrupted")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(_is_int(v) for v in (*shape, start, end)) or not isinstance(shape, list):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for tensor {name!r} "
                                   "(dtype, shape and data_offsets of integers are "
                                   "required)") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                                   f"supported: {', '.join(_DTYPES)}")
        if min(shape, default=0) < 0:
            raise SafetensorsError(f"{path}: tensor {name!r} has a negative dimension in its "
                                   f"shape {shape}; the file is corrupted")
        if not 0 <= start <= end <= data_size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has data offsets [{start}, {end}) that do not fit "
                f"{data_size} data bytes; the file is truncated or corrupted -- download it "
                "again")
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - start != want:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has {end - start} data bytes, but shape {shape} of "
                f"{dtype} needs {want}; the file is corrupted")
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at data byte {start}, "
                                   f"expected {at} (tensors overlap or leave a gap); the file "
                                   "is corrupted")
        at = end
    if at != data_size:
        raise SafetensorsError(f"{path}: the tensors cover {at} of {data_size} data bytes; the "
                               "file is corrupted or has trailing bytes")
    return header, 8 + n


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(repr(key))
        out[key] = value
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, read-only memory-mapped array) for every tensor of a file."""
    header, base = read_header(path)
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        if end == start:
            yield name, np.zeros(shape, dtype)
            continue
        yield name, np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (C-contiguous numpy arrays) in the safetensors format."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in names:
            raise SafetensorsError(f"cannot save tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in blobs:
            f.write(arr.tobytes())
