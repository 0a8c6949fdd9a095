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
    check_writable(parent, f"output {str(path)!r}")
    return path


def check_writable(directory: Path, what: str) -> None:
    """That a file can be made in ``directory`` (by making one and removing it: permission
    bits do not say, for root or on a read-only or virtual file system), before the work
    whose result would go there."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".riffusion-check-"):
            pass
    except OSError as exc:
        raise RiffusionError(f"{what}: cannot write in {str(directory)!r} ({exc.strerror or exc})") from None


def umask_mode(mode: int) -> int:
    """``mode`` less the process's umask: what ``open``/``mkdir`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock named ``path`` (an ``flock`` on a file there) across
    processes, and leave no file behind. The file is unlinked while still locked, so a
    waiter that then gets the lock holds an unlinked file: it sees that the path no
    longer names its file and starts over on a new one."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode(0o666))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass  # unlinked by the holder we waited for
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock


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
