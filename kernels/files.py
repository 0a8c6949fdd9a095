"""Output files: checked before any compute, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import RiffusionError


def check_output_path(path: str | os.PathLike[str], suffixes: Iterable[str]) -> Path:
    """``path`` as a Path after checking its directory exists and its extension is one of ``suffixes``."""
    path = Path(path)
    allowed = tuple(suffixes)
    if path.suffix.lower() not in allowed:
        raise RiffusionError(f"output {str(path)!r}: extension must be one of {', '.join(allowed)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RiffusionError(f"output directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise RiffusionError(f"output {str(path)!r} is a directory")
    return path


def umask_mode(mode: int) -> int:
    """``mode`` less the process's umask: what ``open``/``mkdir`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block succeeds; the
    file gets the mode a plainly created one would (mkstemp's is 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
