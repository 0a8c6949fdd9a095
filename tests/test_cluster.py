"""The Ray Serve application (``serve --ray``) on a local Ray instance (no dashboard, Serve's
HTTP proxy on 127.0.0.1): two engine replicas of random:tiny's export, checked against
the single-process server.

Marked ``cluster`` (a Ray instance and its replicas take a few minutes on two cores):
``pytest -m cluster``; ``.ci/run`` runs them."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
soundfile = pytest.importorskip("soundfile")
websockets = pytest.importorskip("websockets")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from riffusion_engine import PromptInput, Request, RiffusionError, load  # noqa: E402
from riffusion_engine.engine.serve import cluster  # noqa: E402
from riffusion_engine.engine.serve.app import background, create_app  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from test_server import ORIGINAL  # noqa: E402  (the web app's request)

APP = "riffusion-test"
TIMEOUT_S = 60.0  # the server's request timeout, and so the stall a health check tolerates
# Small limits, so that 16 concurrent requests overflow them: 2 replicas x 2 ongoing + 4 queued.
CONFIG = ServerConfig(max_batch=2, max_queue=4, timeout_s=TIMEOUT_S, max_steps=8, max_body_bytes=4096)
CLUSTER = cluster.ClusterConfig(replicas=2, max_ongoing_requests=2, health_check_period_s=1.0)
WAV = {**ORIGINAL, "format": "wav"}


class StalledEngine:
    """An engine whose batches never finish: a stuck device call."""

    def __init__(self, engine: object) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def images(self, *args: object, **kwargs: object) -> object:
        threading.Event().wait()  # forever


class StallingReplica(cluster.EngineReplica):
    """The engine replica, with a way to make it stall."""

    async def stall(self) -> str:
        """From now on, this replica's batches never finish; one starts now."""
        self.server.batcher.engine = StalledEngine(self.server.engine)
        self.server.batcher.submit(Request(PromptInput("stalled"), steps=1))  # a batch that never ends
        return self.replica


# The replicas are Ray workers that cannot import this module: its classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    started = cluster.connect(None, dashboard=False, log_to_driver=False)
    assert started, "a Ray instance was already running in this process"
    try:
        yield
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def spec(tiny_export) -> cluster.EngineSpec:
    return cluster.EngineSpec(str(tiny_export[0]), "onnxruntime", "cpu", "random:tiny")


@pytest.fixture(scope="module")
def url(ray_local, spec) -> str:
    return cluster.deploy(spec, CONFIG, CLUSTER, port=free_port(), name=APP, replica=StallingReplica)


@pytest.fixture(scope="module")
def reference(spec) -> Iterator[str]:
    """The single-process server over the same export, one engine thread as each replica,
    and one BLAS / OpenMP thread as Ray gives a replica of one CPU (it sets
    OMP_NUM_THREADS to the actor's num_cpus): the audio's float sums then run in the same
    order, to the last bit."""
    from threadpoolctl import threadpool_limits

    engine = load(artifacts=spec.artifacts, backend="onnxruntime", threads=1)
    with threadpool_limits(limits=1), background(create_app(engine, CONFIG)) as base:
        yield base


def post(base: str, body: object, timeout: float = 120.0) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}/run_inference/", content=content, timeout=timeout)


def samples(response: httpx.Response) -> np.ndarray:
    data = response.json()["audio"].split(",", 1)[1]
    audio, _ = soundfile.read(io.BytesIO(base64.b64decode(data)), dtype="int16")
    return audio


def replica_actors() -> dict[str, str]:
    """The engine replicas' actor names by replica id (Ray's named actors: no dashboard needed)."""
    return {
        a["name"].rsplit("#", 1)[-1]: a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"{APP}#EngineReplica#" in a["name"]
    }


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def running_replicas(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=30).json().get("replicas", {}).get("RUNNING", 0)


def listening(processes: list) -> list[tuple[str, str, int]]:
    """The (process name, address, port) of every TCP socket these processes listen on."""
    import psutil

    pids = {p.pid: p for p in processes}
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            with contextlib.suppress(psutil.Error):
                found.append((pids[c.pid].name(), c.laddr.ip, c.laddr.port))
    return found


class ServeCommand:
    """``riffusion-engine serve --ray ARGS`` as a user runs it, in its own process: its
    output read line by line, ready once it says it serves random:tiny."""

    def __init__(self, *args: str) -> None:
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "RAY_USAGE_STATS_ENABLED"}  # the CLI sets it
        command = [sys.executable, "-m", "riffusion_engine.engine.cli", "serve", "--ray", *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("serving random:tiny"):
                self.ready.set()

    def wait_ready(self, timeout: float) -> bool:
        """Whether it serves within ``timeout`` s (False at once where the command ended)."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(1.0) and self.process.poll() is None and time.monotonic() < deadline:
            pass
        return self.ready.is_set()

    def said(self, last: int = 40) -> str:
        return "".join(self.lines[-last:])

    def stop(self) -> None:
        """SIGTERM, as a process manager stops it; its output read to the end."""
        import signal

        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self.reader.join(30)


def test_the_command_serves_the_original_request_on_two_replicas(tmp_path: Path):
    """``riffusion-engine serve --ray --replicas 2 --model random:tiny`` as a user runs it:
    the export is made first, Ray starts locally, the original's request is answered, and
    SIGTERM takes the application and Ray down. Ray listens on loopback only (the one thing
    Ray Serve binds to every interface itself: each replica's inter-deployment gRPC
    server), and the command returns only once every process of Ray has ended. (First in
    this module: before the module's own Ray instance starts.)"""
    import psutil

    port, cache = free_port(), str(tmp_path / "cache")
    serving = ServeCommand(
        "--replicas", "2", "--model", "random:tiny", "--port", str(port), "--cache-dir", cache
    )  # fmt: skip
    process = serving.process
    try:
        assert serving.wait_ready(600), serving.said()
        assert f"2 replica(s)) on http://127.0.0.1:{port}" in "".join(serving.lines)
        base = f"http://127.0.0.1:{port}"
        answer = post(base, ORIGINAL)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Replica"]
        assert httpx.get(f"{base}/health", timeout=30).json()["replicas"] == {"RUNNING": 2}

        ray_processes = psutil.Process(process.pid).children(recursive=True)
        sockets = listening([psutil.Process(process.pid), *ray_processes])
        names = {name for name, _, _ in sockets}
        ray_own = {"gcs_server", "raylet", "ray::ServeController", "ray::ProxyActor"}
        assert ray_own | {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        assert (next(t for t, _, p in sockets if p == port)).startswith("ray::ProxyActor")
        exposed = [s for s in sockets if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        replicas = [s for s in exposed if s[0].startswith("ray::ServeReplica:")]
        assert exposed == replicas and len(replicas) <= 3, exposed  # 2 engine replicas, the ingress
    finally:
        serving.stop()
    assert process.returncode == 130, serving.said()
    assert serving.lines[-1].strip() == "riffusion-engine serve: interrupted", serving.said()

    def alive(p: psutil.Process) -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        return False

    left = [p for p in ray_processes if alive(p)]
    assert not left, [" ".join(p.cmdline())[:60] for p in left]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=5)


def test_the_realtime_profile_serves_on_the_cluster_as_in_one_process(tmp_path: Path):
    """``serve --ray --profile realtime``: the export made first has the profile's random
    few-step LoRA and tiny VAE fused in, the replica runs the profile's scheduler, steps,
    guidance and precision, and answers the web app's request with the single-process
    server's audio over that export. Ray Serve says nothing per request (no access log
    line for /health). (Before the module's own Ray instance starts.)"""
    from threadpoolctl import threadpool_limits

    port, cache = free_port(), tmp_path / "cache"
    serving = ServeCommand(
        "--model", "random:tiny", "--profile", "realtime", "--port", str(port), "--cache-dir", str(cache)
    )  # fmt: skip
    try:
        assert serving.wait_ready(900), serving.said()  # (a refusal ends the command at once)
        said = "".join(serving.lines)
        assert "profile realtime: lcm 4 steps, guidance off, backend openvino" in said, said[-2000:]
        base = f"http://127.0.0.1:{port}"
        served = len(serving.lines)
        for _ in range(3):
            assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        answer = post(base, WAV, timeout=300)
        assert answer.status_code == 200, answer.text
        time.sleep(2.0)
        after = "".join(serving.lines[served:])
        assert "/health" not in after and "INFO" not in after, after
    finally:
        serving.stop()
    assert serving.process.returncode == 130, serving.said()
    (manifest,) = cache.glob("*/manifest.json")
    exported = json.loads(manifest.read_text())
    assert exported["run_profile"] == "realtime" and exported["model"]["vae"] != "own"  # the tiny VAE
    assert len(exported["model"]["loras"]) == 1  # the profile's (random) few-step LoRA
    # The single-process server over the same export, one thread as the replica.
    engine = load(artifacts=manifest.parent, threads=1)
    assert (engine.scheduler, engine.steps, engine.guidance) == ("lcm", 4, 1.0)
    with threadpool_limits(limits=1), background(create_app(engine, ServerConfig())) as one:
        alone = post(one, WAV, timeout=300)
    assert alone.status_code == 200, alone.text
    assert np.array_equal(samples(answer), samples(alone))


def test_the_original_request_gets_the_single_process_servers_audio(url, reference):
    got, expected = post(url, WAV), post(reference, WAV)
    assert got.status_code == expected.status_code == 200, got.text
    assert got.headers["X-Replica"] in replica_actors()
    assert got.headers["X-Inference-Steps"] == expected.headers["X-Inference-Steps"]
    assert np.array_equal(samples(got), samples(expected))
    assert got.json()["duration_s"] == expected.json()["duration_s"]
    # The default format too (MP3), without the trailing slash.
    mp3 = httpx.post(f"{url}/run_inference", json=ORIGINAL, timeout=120)
    assert mp3.status_code == 200 and mp3.json()["audio"].startswith("data:audio/mpeg;base64,")


def test_bad_input_gets_the_single_process_servers_answer(url, reference):
    bad: list[object] = [
        b"{not json",
        {**ORIGINAL, "seed_image_id": "no_such_image"},
        {**ORIGINAL, "num_inference_steps": 9},  # over max_steps
        {**ORIGINAL, "alpha": "half"},
        {**ORIGINAL, "start": {**ORIGINAL["start"], "prompt": "   "}},
        {**ORIGINAL, "start": {**ORIGINAL["start"], "negative_prompt": "x" * 5000}},
        {**ORIGINAL, "padding": "x" * 5000},  # over max_body_bytes
    ]
    for body in bad:
        got, expected = post(url, body), post(reference, body)
        assert 400 <= expected.status_code < 500, expected.text
        assert (got.status_code, got.json()) == (expected.status_code, expected.json()), body
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert schema["paths"].keys() == httpx.get(f"{reference}/openapi.json", timeout=30).json()["paths"].keys()


def test_sixteen_concurrent_requests_are_each_answered_once_by_both_replicas(url):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post(url, ORIGINAL, timeout=TIMEOUT_S + 30), range(16)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, [(a.status_code, a.text[:200]) for a in answers]
    served = {a.headers["X-Replica"] for a in answers if a.status_code == 200}
    assert served == set(replica_actors()), "both replicas served requests"
    refused = [a for a in answers if a.status_code == 503]
    assert refused, "2 replicas x 2 ongoing + 4 queued cannot hold 16"
    assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)

    def counted() -> dict[str, float] | None:
        text = httpx.get(f"{url}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        per_replica: dict[str, float] = {}
        for sample in families["riffusion_requests"].samples:
            if sample.name.endswith("_total") and sample.labels["status"] == "200":
                replica = sample.labels["replica"]
                per_replica[replica] = per_replica.get(replica, 0.0) + sample.value
        return per_replica if set(per_replica) >= served else None

    per_replica = wait_for(counted, 3 * cluster.METRICS_PERIOD_S + 10, "every replica's metrics")
    assert all(per_replica[r] >= 1 for r in served)


def test_a_stream_stays_on_one_replica_and_plays_as_on_one_server(url, reference):
    start = {"type": "start", "start": {"prompt": "jazz", "seed": 3}, "num_inference_steps": 4}

    async def first_clip(base: str) -> tuple[dict, bytes, str]:
        async with websockets.connect(base.replace("http", "ws") + "/stream", max_size=None) as ws:
            await ws.send(json.dumps(start))
            ready = json.loads(await ws.recv())
            event = json.loads(await ws.recv())
            assert event["type"] == "clip" and event["index"] == 0, event
            audio = await ws.recv()
            await ws.send(json.dumps({"type": "stop"}))
            last = None
            async for message in ws:
                if isinstance(message, str):
                    last = json.loads(message)
            assert last is not None and last["type"] == "stopped"
            assert ws.close_code == 1000
            return ready, audio, event["image"]

    got_ready, got_audio, got_image = asyncio.run(first_clip(url))
    ready, audio, image = asyncio.run(first_clip(reference))
    assert got_ready == ready
    assert got_audio == audio and got_image == image


def ingress_retries(base: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    return sum(s.value for s in families["riffusion_ingress_retries"].samples if s.name.endswith("_total"))


def test_a_replica_killed_during_load_leaves_no_request_unanswered(url):
    before = replica_actors()
    victim = sorted(before)[0]
    retries = ingress_retries(url)
    # Longer requests (5 UNet calls each, two per replica at once): the victim is mid-request,
    # and its two, retried on the other replica after that one's own, end within the timeout
    # on a 2-core machine.
    slow = {**ORIGINAL, "num_inference_steps": 4, "start": {**ORIGINAL["start"], "denoising": 1.0}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, url, slow, TIMEOUT_S + 30) for _ in range(4)]
        time.sleep(1.5)  # the requests are on the replicas
        ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
        answers = [f.result() for f in futures]  # each returns: none hangs past the client's timeout
    assert {a.status_code for a in answers} <= {200, 503}, [a.text[:200] for a in answers]
    assert ingress_retries(url) > retries, "the victim's requests were retried on the other replica"
    replaced = wait_for(
        lambda: (set(replica_actors()) - set(before)) and running_replicas(url) == 2,
        120,
        "a new replica in the killed one's place",
    )
    assert replaced
    assert victim not in replica_actors()
    after = [post(url, ORIGINAL) for _ in range(3)]
    assert [a.status_code for a in after] == [200] * 3


def test_a_stalled_replica_is_reported_unhealthy_and_replaced(url):
    before = replica_actors()
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP)
    stalled = handle.stall.remote().result(timeout_s=30)
    assert stalled in before
    begin = time.monotonic()
    # Its health check fails once its batch has made no progress for the request timeout.
    wait_for(lambda: stalled not in replica_actors(), TIMEOUT_S + 60, "the stalled replica removed")
    assert time.monotonic() - begin >= TIMEOUT_S - 2, "not before its batch was stuck for the timeout"
    wait_for(lambda: running_replicas(url) == 2, 120, "a replacement running")
    answers = [post(url, ORIGINAL) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert stalled not in {a.headers["X-Replica"] for a in answers}


def test_replica_metrics_merge_with_a_replica_label():
    text_a = '# HELP x_total things\n# TYPE x_total counter\nx_total{status="200"} 3.0\n'
    text_b = '# HELP x_total things\n# TYPE x_total counter\nx_total{status="200"} 4.0\n'
    merged = cluster.merge_metrics({"a": text_a, "b": text_b})
    (family,) = text_string_to_metric_families(merged)
    values = {s.labels["replica"]: s.value for s in family.samples if s.name == "x_total"}
    assert values == {"a": 3.0, "b": 4.0}
    assert merged.count("# TYPE") == 1


def test_nothing_is_deployed_without_an_export_that_takes_the_batch(tmp_path: Path, spec):
    missing = cluster.EngineSpec(str(tmp_path), "onnxruntime", "cpu", "missing")
    with pytest.raises(RiffusionError, match="no export at"):
        missing.check()
    with pytest.raises(RiffusionError, match="is more than this model's export takes"):
        cluster.deploy(spec, ServerConfig(max_batch=64), CLUSTER, port=free_port(), name="refused")
    with pytest.raises(RiffusionError, match="torch backend"):
        cluster.prepare("random:tiny", None, backend="torch", device="cpu", precision="fp32", cache_dir=None)
