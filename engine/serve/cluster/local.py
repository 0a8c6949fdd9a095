"""Ray itself: joined at an address, or started here as a one-node instance that only this
machine talks to (:func:`connect`), and stopped with every process it started
(:func:`shutdown`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ....kernels.errors import RiffusionError
from ...runtime.interrupts import interrupt
from .config import NAMESPACE

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Ray 2.x's switch for a node that only its own machine reaches (its default on Windows and
# macOS): read into ray._private.ray_constants.ENABLE_RAY_CLUSTER when ray is imported.
SINGLE_MACHINE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
STOP_GRACE_S = 2.0


def require_ray() -> Any:
    """The ray module, or one clear error saying to install the cluster extra."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise RiffusionError(
            f"--ray needs the cluster extra ({exc.name} is missing): pip install 'riffusion-engine[cluster]'"
        ) from None
    return ray


def connect(address: str | None, *, host: str = "127.0.0.1", dashboard: bool = True, **init: Any) -> bool:
    """Join the Ray cluster at ``address``, or start a local one; True when a local one was
    started here (the caller stops it with :func:`shutdown`).

    A local Ray is one node that only this machine talks to: its GCS, raylet, workers,
    agents and metrics servers listen on 127.0.0.1 (:func:`_loopback_node`). Its dashboard,
    where ``dashboard``, listens on ``host``, as Serve's HTTP proxy does."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's usage reporting: off unless asked
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=NAMESPACE, **init)
        _stop_on_sigterm()
        return False
    with _loopback_node():
        ray.init(namespace=NAMESPACE, include_dashboard=dashboard, dashboard_host=host, **init)
    _stop_on_sigterm()
    node = ray.util.get_node_ip_address()
    if node not in LOOPBACK:
        log.warning("this Ray's processes listen on %s, not only on 127.0.0.1", node)
    return True


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """A Ray started within takes 127.0.0.1 as its node's address, and its processes bind
    to it. ``ray.init(_node_ip_address="127.0.0.1")`` cannot ask for that: Ray 2.60's
    ``init`` swaps a loopback address for the machine's (``services.resolve_ip_for_localhost``),
    and its GCS, raylet and workers then listen on every interface, its agents and metrics
    servers on the machine's address. Where ``ENABLE_RAY_CLUSTER`` is off,
    ``services.get_node_ip_address`` gives 127.0.0.1 instead; the constant is read from
    :data:`SINGLE_MACHINE_VAR` when ray is imported (already, here), so both are set, the
    variable for Ray's processes started meanwhile (the raylet hands it on to the workers and
    agents it starts later). :func:`connect` checks the node's address afterwards."""
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without the module: the variable alone, checked after
        ray_constants = None
    before = os.environ.get(SINGLE_MACHINE_VAR)
    constant = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[SINGLE_MACHINE_VAR] = "0"
    if constant is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SINGLE_MACHINE_VAR, None)
        else:
            os.environ[SINGLE_MACHINE_VAR] = before
        if constant is not None:
            ray_constants.ENABLE_RAY_CLUSTER = constant


def _stop_on_sigterm() -> None:
    """``ray.init`` makes SIGTERM exit the process at once (``sys.exit(15)``); SIGTERM
    unwinds as Ctrl-C does instead, so the caller deletes its application and stops Ray."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def shutdown(grace_s: float = STOP_GRACE_S) -> None:
    """Stop Serve and the Ray started here by :func:`connect`, and return once every process
    of it has ended. ``ray.shutdown`` stops the processes the driver started (GCS, raylet,
    dashboard) but not the raylet's own children: its dashboard and runtime-env agents
    notice the raylet gone only about a minute later, listening until then, and actors may
    still be stopping. Whatever of Ray is left after ``grace_s`` gets SIGTERM, then SIGKILL
    after ``grace_s`` more, as ``ray stop`` does."""
    import psutil
    import ray
    from ray import serve

    processes = _ray_processes()
    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for signal_name in ("terminate", "kill"):
        for process in alive:
            with contextlib.suppress(psutil.Error):
                getattr(process, signal_name)()
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        if not alive:
            return
    log.warning("Ray processes still running after SIGKILL: %s", [p.pid for p in alive])


def _ray_processes() -> list[Any]:
    """This process's descendants that are Ray's: its binaries and Python processes (by
    their command line: the ray package's directory), workers and agents (``ray::``
    titles) and the dashboard's modules (``ray-dashboard-...``)."""
    import psutil
    import ray

    package = os.path.dirname(ray.__file__)
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(process.cmdline())
            if line.startswith(("ray::", "ray-")) or package in line:
                found.append(process)
    return found
