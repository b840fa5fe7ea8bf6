"""Atomic writes, the one implementation: a crash leaves the old file or directory or the new
one, never half of one. Files and directories are flushed to disk before the rename that
publishes them, and the rename itself is flushed through the parent directory.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (directories: best effort, not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """Where `path` is staged: a hidden `.tmp-NAME-PID` beside it (no moectl reader matches it)."""
    return path.parent / f".tmp-{path.name}-{os.getpid()}"


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write to a hidden temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


@contextmanager
def staged_directory(out: Union[str, Path]) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place when the block succeeds,
    replacing `out` (which the caller has checked may go). If the block fails, the sibling is
    removed and `out` is as it was; a sibling left by a killed process is never read as `out`.
    Every file in it gets the mode a new file gets here (0666 less the umask): some writers
    (safetensors) create theirs private, 0600, and a directory meant to be shared must not mix."""
    out = Path(out)
    tmp = temporary_sibling(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mode = tmp.stat().st_mode & 0o666  # mkdir applied the umask to 0777, as open() does to 0666
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(mode)
            _fsync(path)
        _fsync(tmp)
        if out.exists():
            trash = out.parent / f".tmp-old-{out.name}-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
