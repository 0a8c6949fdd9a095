"""SIGINT and SIGTERM as KeyboardInterrupt, with a record that the main thread has begun
to unwind: a watcher (the command line's) can tell a signal being handled from one
waiting behind a long native call, which Python's handlers cannot interrupt."""

from __future__ import annotations

import threading
from typing import Any

unwinding = threading.Event()  # set by interrupt(): the main thread runs Python again


def interrupt(signum: int, frame: Any) -> None:
    """A signal handler: unwind as Ctrl-C does (``finally`` blocks run, temporaries go)."""
    unwinding.set()
    raise KeyboardInterrupt
