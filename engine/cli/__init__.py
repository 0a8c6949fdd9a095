"""The ``riffusion-engine`` command line: one module per command, each with its
``add_parser`` and ``run``.

Each subcommand imports what it needs when it runs, so that ``--help`` and the
light commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ...kernels.errors import RiffusionError
from ..runtime.interrupts import interrupt, unwinding
from . import (
    audio_to_image,
    bench,
    demo,
    doctor,
    export,
    generate,
    image_to_audio,
    interpolate,
    roundtrip,
    serve,
    stream,
)

log = logging.getLogger("riffusion_engine")

# In the order --help lists them.
COMMANDS = (
    audio_to_image,
    image_to_audio,
    export,
    generate,
    interpolate,
    stream,
    bench,
    serve,
    demo,
    doctor,
    roundtrip,
)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, where the help does not already say it (flags
    and options without a default have none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "default" in text or not action.option_strings or unset or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("riffusion-engine")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riffusion-engine",
        description="Optimized inference engine for Riffusion.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    parser.add_argument("--version", action="version", version=f"riffusion-engine {_version()}")
    # -v after the command too (not overriding one given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress and details"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class _Sub:
        def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
            p = commands.add_parser(name, parents=[common], formatter_class=HelpFormatter, **kwargs)
            p.set_defaults(command_parser=p)  # its errors come with its own usage
            return p

    sub = _Sub()

    for command in COMMANDS:
        command.add_parser(sub)
    return parser


# Libraries whose warnings (deprecations, optional packages such as torchvision, config
# advice) concern their own users, not this command's: shown with -v.
THIRD_PARTIES = (
    "transformers",
    "diffusers",
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "huggingface_hub",
)


def _quiet_third_parties() -> None:
    import os
    import warnings

    for name in THIRD_PARTIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers and diffusers reset their loggers' level on first use, from these.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


# After SIGINT or SIGTERM the main thread unwinds (KeyboardInterrupt) when it next runs
# Python: a native call (a UNet call over a very wide clip) can hold it for minutes.
GRACE_S = 3.0


class _Watchdog:
    """Python's C-level signal handler writes each signal to a wakeup descriptor at once,
    whatever the main thread is running; this thread reads it. Where the main thread has not
    begun to unwind (its Python handler has not run) within ``GRACE_S``, the process ends
    with 130: an interrupted command stops within seconds, its outputs not yet written (they
    are written after the work, through temporary names)."""

    def __init__(self, command: str) -> None:
        import os

        self.command = command
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.previous = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="riffusion-signals", daemon=True).start()

    def _watch(self) -> None:
        import os

        stopping = {signal.SIGINT, signal.SIGTERM}  # (a library may handle others, SIGCHLD say)
        try:
            while True:
                received = os.read(self.read, 64)
                if not received:  # closed: the command ended
                    os.close(self.read)
                    return
                if stopping & set(received):
                    break
        except OSError:
            return
        if unwinding.wait(GRACE_S):
            return
        print(
            f"riffusion-engine {self.command}: interrupted (during a computation that cannot stop "
            "part-way: the process ends now)",
            file=sys.stderr,
        )
        _exit_now(130)

    def close(self) -> None:
        import os

        signal.set_wakeup_fd(self.previous)
        os.close(self.write)  # the watching thread reads the end and returns


def _exit_now(code: int) -> None:
    """End the process at once, its outputs written and closed (``stream``'s audio file is
    closed when its command returns): after Ctrl-C, threads that ran torch, ONNX Runtime or
    SciPy's FFT may leave native thread pools that the interpreter's shutdown aborts in
    ("terminate called without an active exception", exit 134, in 2 of 4 tries) instead of
    exiting with ``code``."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _forget_unhandled_interrupt() -> None:
    """The KeyboardInterrupt is handled: say so to CPython. A signal can land in code that
    a library compiles with exec() (dataclasses build their methods so, on import): CPython
    then records the KeyboardInterrupt as unhandled, even once it is caught, and a process
    started with ``python -m`` ends by SIGINT (-2) instead of with the 130 returned. Each
    exec() of a string clears that record as it begins; one that raises nothing leaves it
    clear."""
    exec("pass")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, with its usage, not the top level's
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_third_parties()
    func: Callable[[argparse.Namespace], None] = args.func
    # SIGTERM unwinds as Ctrl-C does, so finally blocks remove temporary files and folders
    # (the server handles both signals itself: it finishes the requests in flight).
    previous = None
    watchdog = None
    handles_signals = args.command == "serve" and not args.ray
    if not handles_signals and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, interrupt), signal.signal(signal.SIGINT, interrupt)
        if argv is None:  # its own process: a signal in a long native call ends it
            unwinding.clear()
            watchdog = _Watchdog(args.command)
    try:
        func(args)
    except RiffusionError as exc:
        print(f"riffusion-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"riffusion-engine {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _forget_unhandled_interrupt()
        print(f"riffusion-engine {args.command}: interrupted", file=sys.stderr)
        if argv is None and args.command == "stream":  # its own process, its threads in native code
            _exit_now(130)
        return 130
    finally:
        if watchdog is not None:
            watchdog.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
    return 0
