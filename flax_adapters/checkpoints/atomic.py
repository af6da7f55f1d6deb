"""Writing a directory so that a reader never sees it half-written."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Callable


def write_dir_atomically(out_dir: str | os.PathLike,
                         files: dict[str, Callable[[pathlib.Path], None]]) -> pathlib.Path:
    """Writes `files` ({name: writer(path)}) into a temporary sibling of
    `out_dir`, then renames it into place. An existing `out_dir` is replaced
    by two renames: if interrupted between them, the old one is intact beside
    it. A failed write removes the temporary directory and leaves `out_dir`
    as it was."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is an ordinary directory
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_text_atomically(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes `text` to a temporary sibling of `path` and renames it into
    place: a reader (or a run killed mid-write) sees the old file or the new
    one, never a torn one."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
