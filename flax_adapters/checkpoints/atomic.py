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
