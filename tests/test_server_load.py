"""The server under load, on random:tiny: batching, the queue, timeouts, failures, shutdown
and overload (degraded steps), with a real uvicorn server and real HTTP clients. The oracle
is the engine run alone on each request."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from riffusion_engine import load  # noqa: E402
from riffusion_engine.engine.runtime.pipeline import Engine  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402
from riffusion_engine.engine.runtime.seeds import SeedLibrary  # noqa: E402
from riffusion_engine.engine.serve.app import create_app  # noqa: E402
from riffusion_engine.engine.serve.batcher import Batcher  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402
from test_server import ORIGINAL, data_url, engine_request, jpeg, post, running  # noqa: E402

# -- batching, the queue, timeouts, failures ----------------------------------------


def _requests(n: int) -> list[dict]:
    return [
        {
            **ORIGINAL,
            "alpha": i / n,
            "format": "wav",
            "mask_image_id": "mask_top_third_75" if i % 2 else None,
            "start": {**ORIGINAL["start"], "seed": 1000 + i},
        }
        for i in range(n)
    ]


@pytest.mark.long
def test_a_batch_gives_each_request_what_it_gets_alone(torch_engine) -> None:
    config = ServerConfig(max_batch=3, batch_window_ms=2000)
    batcher = Batcher(torch_engine, config)
    batcher.start()
    try:
        requests = [engine_request(b) for b in _requests(3)]
        jobs = [batcher.submit(r) for r in requests]
        clips = [job.future.result(120) for job in jobs]
    finally:
        batcher.close()
    assert batcher.metrics.registry.get_sample_value("riffusion_batch_size_sum") == 3  # one batch of three
    for request, clip in zip(requests, clips, strict=True):
        (alone,) = torch_engine.run([request])
        # Not bitwise: torch's kernels block their sums by batch size (see test_runtime).
        assert np.abs(np.asarray(clip.image, float) - np.asarray(alone.image, float)).max() <= 1


@pytest.mark.long
def test_many_clients_get_200_or_503_none_lost_or_mixed_up(torch_engine) -> None:
    bodies = _requests(12)
    answers: list[httpx.Response | None] = [None] * len(bodies)
    with running(torch_engine, max_batch=4, batch_window_ms=300, max_queue=6) as url:
        barrier = threading.Barrier(len(bodies))

        def client(i: int) -> None:
            barrier.wait()
            answers[i] = post(url, bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        metrics = httpx.get(url + "/metrics").text
        assert httpx.get(url + "/health").json()["queue_depth"] == 0
    assert all(a is not None for a in answers)
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, [a.text for a in answers if a.status_code not in (200, 503)]
    assert 6 <= statuses.count(200) < len(bodies)
    for a in answers:
        if a.status_code == 503:
            assert int(a.headers["Retry-After"]) >= 1
    assert "riffusion_batch_size_bucket" in metrics
    sizes = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if family.name == "riffusion_batch_size"
    }
    assert sizes["riffusion_batch_size_sum"] > sizes["riffusion_batch_size_count"]  # some batched
    images = {}
    for body, answer in zip(bodies, answers, strict=True):
        if answer.status_code == 200:
            encoded = data_url(answer.json()["image"], "image/jpeg")
            images[body["start"]["seed"]] = np.asarray(Image.open(io.BytesIO(encoded)), float)
            (alone,) = torch_engine.run([engine_request(body)])
            assert np.abs(images[body["start"]["seed"]] - np.asarray(jpeg(alone.image), float)).mean() < 0.5
    seeds = sorted(images)
    for a, b in itertools.pairwise(seeds):
        assert np.abs(images[a] - images[b]).mean() > 2  # distinct requests, distinct answers


def test_a_request_over_its_timeout_gets_504_and_frees_its_slot(torch_engine) -> None:
    # A 2-step request takes about 1 s here; a 40-step one about 20 s.
    with running(torch_engine, timeout_s=4, max_steps=40, max_queue=1) as url:
        slow = {**ORIGINAL, "num_inference_steps": 40, "start": {**ORIGINAL["start"], "denoising": 1.0}}
        begin = time.monotonic()
        answer = post(url, slow)
        assert answer.status_code == 504, answer.text
        assert "timeout" in answer.json()["detail"]
        assert time.monotonic() - begin < 10
        assert httpx.get(url + "/health").json()["queue_depth"] == 0
        # The slot is free at once (max_queue 1), and the abandoned batch stops at its next step.
        begin = time.monotonic()
        answer = post(url, {**ORIGINAL, "num_inference_steps": 2})
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - begin < 4


class ExplodingEngine(Engine):
    """The engine, failing any batch that holds the prompt "explode"."""

    def images(self, requests, **kwargs):
        if any(r.start.prompt == "explode" for r in requests):
            raise RuntimeError("the engine failed")
        return super().images(requests, **kwargs)


def test_an_exception_fails_only_its_own_request(torch_engine) -> None:
    engine = ExplodingEngine(
        torch_engine.backend, torch_engine.tokenizer, torch_engine.scheduler_config, torch_engine.shape
    )
    bad = {**ORIGINAL, "start": {**ORIGINAL["start"], "prompt": "explode"}}
    answers = {}
    with running(engine, max_batch=2, batch_window_ms=2000) as url:
        threads = [
            threading.Thread(target=lambda k=k, b=b: answers.__setitem__(k, post(url, b)))
            for k, b in (("bad", bad), ("good", ORIGINAL))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert post(url, ORIGINAL).status_code == 200  # the server is still up
    assert answers["good"].status_code == 200
    assert answers["bad"].status_code == 500
    assert "the engine failed" in answers["bad"].json()["detail"]


def test_server_options_are_checked(torch_engine, tiny_export) -> None:
    with pytest.raises(RiffusionError, match="max_batch"):
        ServerConfig(max_batch=0)
    with pytest.raises(RiffusionError, match="timeout_s"):
        ServerConfig(timeout_s=float("nan"))
    with pytest.raises(
        RiffusionError, match=r"--stream-opus-kbps \(stream_opus_kbps\) must be in 16..256, got 8"
    ):
        ServerConfig(stream_opus_kbps=8)
    exported = load(artifacts=tiny_export[0], backend="onnxruntime")
    with pytest.raises(RiffusionError, match="export with a larger --max-batch"):
        create_app(exported, ServerConfig(max_batch=exported.shape.max_batch + 1))


@pytest.mark.long
def test_shutdown_finishes_the_request_in_flight(tmp_path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "riffusion_engine.engine.cli", "serve", "--model", "random:tiny"]
    command += ["--backend", "torch", "--port", str(port), "--max-steps", "20"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        answers = []
        slow = {**ORIGINAL, "num_inference_steps": 8, "start": {**ORIGINAL["start"], "denoising": 1.0}}
        client = threading.Thread(target=lambda: answers.append(post(url, slow)))
        client.start()
        while httpx.get(url + "/health").json()["queue_depth"] == 0:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        client.join(120)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    assert answers and answers[0].status_code == 200, answers and answers[0].text


def test_serve_cli_rejects_bad_options() -> None:
    from conftest import run_cli

    code, _, err = run_cli("serve", "--model", "random:tiny", "--backend", "torch", "--max-queue", "0")
    assert code == 2
    assert err.strip().count("\n") == 0 and "--max-queue (max_queue) must be at least 1, got 0" in err
    code, _, err = run_cli("serve", "--model", "random:tiny", "--degrade-steps", "200")
    assert code == 2 and "--degrade-steps (degrade_steps) must be in 1..--max-steps (100), got 200" in err
    # The cluster's options: one line each, before Ray starts or anything is exported.
    for argv, message in (
        (("--replicas", "2"), "--replicas is an option of --ray"),
        (("--ray", "--replicas", "2", "--max-replicas", "3"), "--replicas is a fixed count"),
        (
            ("--ray", "--max-ongoing-requests", "0"),
            "--max-ongoing-requests (max_ongoing_requests) must be at least 1",
        ),
        (("--ray", "--replicas", "0"), "--replicas (replicas) must be at least 1, got 0"),
        (
            ("--ray", "--min-replicas", "3", "--max-replicas", "2"),
            "--max-replicas (max_replicas) must be at least --min-replicas (3)",
        ),
        (("--ray", "--backend", "torch"), "the torch backend runs from a model source"),
        (("--ray", "--max-width", "4096"), "--max-width serves from one process"),
    ):
        code, _, err = run_cli("serve", "--model", "random:tiny", *argv)
        assert code == 2 and message in err and err.strip().count("\n") == 0, err


# -- overload: degrade instead of refusing -------------------------------------------------


@pytest.mark.long
def test_a_saturated_server_degrades_steps_instead_of_timing_out(torch_engine, tmp_path: Path) -> None:
    """Ten requests at once, more than the timeout allows at their steps: with
    --degrade-steps none times out — each is answered in time, some with fewer steps, and
    each answer is the one-shot run at the steps it reports (a request is refused only
    where even the fewest steps would miss the deadline) — while without it some do (504)."""
    import dataclasses

    import soundfile
    from riffusion_engine.engine.serve.api import engine_request, parse_input

    Image.new("RGB", (128, 512), (90, 90, 90)).save(tmp_path / "narrow.png")  # 1.28 s clips: cheap
    bodies = [
        {
            **ORIGINAL,
            "num_inference_steps": 12,
            "seed_image_id": "narrow",
            "start": {**ORIGINAL["start"], "seed": 100 + i, "denoising": 1.0},
            "end": {**ORIGINAL["end"], "denoising": 1.0},
            "format": "wav",
        }
        for i in range(10)
    ]

    def load(config: ServerConfig) -> list[httpx.Response]:
        with running(torch_engine, **dataclasses.asdict(config)) as url:
            # Requests first: a server in steady state knows what a clip of this width costs.
            for steps in (2, 12):
                assert post(url, {**bodies[0], "num_inference_steps": steps}).status_code == 200
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                return list(pool.map(lambda body: post(url, body), bodies))

    # The timeout: 6 s, or five 12-step clips' time where this machine is slower, so that
    # ten such requests saturate the server here as they do on a faster machine.
    base = ServerConfig(max_batch=1, batch_window_ms=0, max_steps=20, timeout_s=6, seed_images=tmp_path)
    first = parse_input(json.dumps(bodies[0]).encode())
    one = engine_request(first, torch_engine, SeedLibrary(tmp_path), base)
    torch_engine.run([dataclasses.replace(one, steps=2)])  # warm
    begin = time.perf_counter()
    torch_engine.run([one])
    base = dataclasses.replace(base, timeout_s=max(6.0, round(5 * (time.perf_counter() - begin), 1)))
    answers = answers_all = load(dataclasses.replace(base, degrade_steps=2))
    codes = [a.status_code for a in answers]
    # In time, every one: answered, or refused at once where even 2 steps would miss the deadline.
    assert set(codes) <= {200, 503} and codes.count(200) >= len(bodies) // 2, codes
    for answer in answers:
        if answer.status_code == 503:
            assert "even 2 steps would miss" in answer.json()["detail"] and answer.headers["retry-after"]
    answers = [a for a in answers if a.status_code == 200]
    steps = [int(a.headers["x-inference-steps"]) for a in answers]
    assert all(2 <= s <= 12 for s in steps) and min(steps) < 12, steps
    served = [b for b, a in zip(bodies, answers_all, strict=True) if a.status_code == 200]
    for body, answer, ran in zip(served, answers, steps, strict=True):
        assert ("x-requested-steps" in answer.headers) == (ran < 12)
        request = engine_request(
            parse_input(json.dumps(body).encode()), torch_engine, SeedLibrary(tmp_path), base
        )
        (alone,) = torch_engine.run([dataclasses.replace(request, steps=ran)])
        audio, _ = soundfile.read(io.BytesIO(data_url(answer.json()["audio"], "audio/wav")), dtype="int16")
        np.testing.assert_array_equal(audio, alone.audio[0])

    answers = load(base)  # as before: no degradation, the late requests time out
    codes = [a.status_code for a in answers]
    assert 504 in codes and set(codes) <= {200, 504}, codes
    assert all(a.headers.get("x-inference-steps") == "12" for a in answers if a.status_code == 200)


def test_degrade_steps_must_fit_the_step_cap() -> None:
    with pytest.raises(RiffusionError, match="degrade_steps"):
        ServerConfig(max_steps=20, degrade_steps=30)
    with pytest.raises(RiffusionError, match="degrade_steps"):
        ServerConfig(degrade_steps=0)


class HangingEngine(Engine):
    """The engine, hanging in its batches until released (a stuck device call)."""

    release = threading.Event()

    def images(self, requests, **kwargs):
        self.release.wait()
        return super().images(requests, **kwargs)


def test_a_batch_without_progress_reports_the_batcher_stalled(torch_engine) -> None:
    """What a cluster replica's health check asks: a batch that reaches no UNet step for
    longer than the limit is stalled; a working or idle batcher is not."""
    engine = HangingEngine(
        torch_engine.backend, torch_engine.tokenizer, torch_engine.scheduler_config, torch_engine.shape
    )
    batcher = Batcher(engine, ServerConfig(batch_window_ms=0))
    batcher.start()
    assert batcher.stalled(0.2) is None  # idle
    job = batcher.submit(Request(PromptInput("a", 1), steps=2, width=256))
    time.sleep(0.5)
    assert "no progress" in (batcher.stalled(0.2) or "")
    assert batcher.stalled(60) is None  # not past a longer limit
    engine.release.set()
    assert job.future.result(120).audio.shape[-1] > 0
    assert batcher.stalled(0.2) is None  # it moved on and finished
    batcher.close()
