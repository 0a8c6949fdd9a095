"""The HTTP server on random:tiny: a real uvicorn server on a loopback port and a real
HTTP client. The oracle for every answer is the engine run directly on the request
the original API describes."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from riffusion_engine import load  # noqa: E402
from riffusion_engine.engine.runtime.pipeline import Engine  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402
from riffusion_engine.engine.runtime.seeds import MASKS, SEED_AUDIO, SeedLibrary, mask_image, seed_image  # noqa: E402
from riffusion_engine.engine.serve.app import background, create_app  # noqa: E402
from riffusion_engine.engine.serve.batcher import Batcher  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402
from riffusion_engine.kernels.params import SpectrogramParams  # noqa: E402

# The request Riffusion's web app sends (its field order, its values), cheap on random:tiny:
# 4 steps at denoising 0.5 run 2 UNet steps.
ORIGINAL = {
    "alpha": 0.25,
    "num_inference_steps": 4,
    "seed_image_id": "og_beat",
    "mask_image_id": None,
    "start": {"prompt": "church bells on sunday", "seed": 42, "denoising": 0.5, "guidance": 7.0},
    "end": {"prompt": "jazz with piano", "seed": 123, "denoising": 0.5, "guidance": 7.0},
}


def running(engine: Engine, **options):
    """A real server for ``engine`` on a free loopback port (a context yielding its URL)."""
    return background(create_app(engine, ServerConfig(**options)))


@pytest.fixture(scope="module")
def server(torch_engine) -> Iterator[str]:
    with running(torch_engine, max_steps=8, max_body_bytes=4096, batch_window_ms=0) as url:
        yield url


def engine_request(body: dict) -> Request:
    """What the original API means by ``body``, built by hand from the built-in images."""

    def end(e: dict) -> PromptInput:
        return PromptInput(e["prompt"], e["seed"], e.get("negative_prompt"), e["guidance"], e["denoising"])

    mask = mask_image(body["mask_image_id"]) if body.get("mask_image_id") else None
    return Request(
        end(body["start"]),
        end(body["end"]),
        body["alpha"],
        body["num_inference_steps"],
        512,
        seed_image=seed_image(body["seed_image_id"]),
        mask=mask,
    )


def data_url(value: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert value.startswith(prefix), value[:40]
    return base64.b64decode(value[len(prefix) :], validate=True)


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/run_inference/", content=content, timeout=120, **kwargs)


# -- the original's request and response --------------------------------------------


@pytest.mark.parametrize("path", ["/run_inference/", "/run_inference"])
def test_the_original_request_gets_a_well_formed_answer(server, path: str) -> None:
    import soundfile

    # As the web app sends it: a JSON string, Content-Type text/plain.
    answer = httpx.post(
        server + path,
        content=json.dumps(ORIGINAL),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"image", "audio", "duration_s"}
    image = Image.open(io.BytesIO(data_url(body["image"], "image/jpeg")))
    assert (image.format, image.size) == ("JPEG", (512, 512))
    assert image.getexif()[11000] == 44100  # Riffusion's parameters travel with the image
    audio, rate = soundfile.read(io.BytesIO(data_url(body["audio"], "audio/mpeg")))
    assert rate == 44100
    assert body["duration_s"] == pytest.approx(5.11, abs=0.01)
    # MP3 frames pad the end; the audio is at least as long and at most one frame longer.
    assert 0 <= len(audio) / rate - body["duration_s"] < 0.1
    assert np.abs(audio).max() > 0.1


def test_the_answer_is_the_engine_run_on_the_request_the_body_describes(server, torch_engine) -> None:
    import soundfile

    body = {**ORIGINAL, "alpha": 0.6, "mask_image_id": "mask_top_third_75", "format": "wav"}
    answer = post(server, body)
    assert answer.status_code == 200, answer.text
    audio, rate = soundfile.read(io.BytesIO(data_url(answer.json()["audio"], "audio/wav")), dtype="int16")
    (expected,) = torch_engine.run([engine_request(body)])
    assert rate == expected.sample_rate
    np.testing.assert_array_equal(audio, expected.audio[0])
    image = Image.open(io.BytesIO(data_url(answer.json()["image"], "image/jpeg")))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(jpeg(expected.image)))


def jpeg(image: Image.Image) -> Image.Image:
    """``image`` after a JPEG round trip (PIL's defaults, as the original server saves)."""
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG")
    return Image.open(encoded)


def test_flac_answers(server) -> None:
    import soundfile

    answer = post(server, {**ORIGINAL, "format": "flac"})
    assert answer.status_code == 200, answer.text
    audio, rate = soundfile.read(io.BytesIO(data_url(answer.json()["audio"], "audio/flac")))
    assert len(audio) / rate == pytest.approx(answer.json()["duration_s"])


def test_health_metrics_and_openapi(server) -> None:
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "torch"
    assert {"og_beat", "agile", "marim", "motorway", "vibes", "mask_beat_lines_80"} <= set(
        health["image_ids"]
    )
    post(server, {**ORIGINAL, "alpha": 2})
    metrics = httpx.get(server + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        'riffusion_requests_total{status="422"}',
        "riffusion_request_seconds_bucket",
        "riffusion_queue_depth",
        "riffusion_batch_size_bucket",
    ):
        assert name in metrics.text
    schema = httpx.get(server + "/openapi.json").json()
    body = schema["paths"]["/run_inference/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"alpha", "num_inference_steps", "seed_image_id", "mask_image_id", "start", "end"} <= set(
        body["properties"]
    )
    assert set(body["required"]) == {"alpha", "start", "end"}
    assert {"prompt", "seed"} <= set(body["properties"]["start"]["required"])


# -- bad input ----------------------------------------------------------------------


def _with(path: str, value) -> dict:
    body = json.loads(json.dumps(ORIGINAL))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    if value is _with:
        node.pop(last, None)
    else:
        node[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (_with("alpha", 1.5), 422, "alpha"),
        (_with("alpha", "0.5"), 422, "alpha"),
        (_with("alpha", _with), 422, "alpha"),
        (_with("start.denoising", -0.1), 422, "start.denoising"),
        (_with("end.guidance", 1e9), 422, "end.guidance"),
        (_with("start.seed", "1"), 422, "start.seed"),
        (_with("start.seed", -1), 422, "start.seed"),
        (_with("start.seed", True), 422, "start.seed"),
        (_with("end", _with), 422, "end"),
        (_with("start.prompt", ""), 422, "start.prompt"),
        (_with("end.negative_prompt", 3), 422, "end.negative_prompt"),
        (_with("num_inference_steps", 0), 422, "num_inference_steps"),
        (_with("num_inference_steps", 9), 422, "num_inference_steps"),  # the server's max is 8
        (_with("num_inference_steps", 2.5), 422, "num_inference_steps"),
        (_with("seed_image_id", "../og_beat"), 422, "seed_image_id"),
        (_with("mask_image_id", "/etc/passwd"), 422, "mask_image_id"),
        (_with("seed_image_id", "no_such_beat"), 400, "seed_image_id"),
        (_with("mask_image_id", "og_beat_mask"), 400, "mask_image_id"),
        (_with("format", "aiff"), 422, "format"),
        ([ORIGINAL], 422, "body"),
        (b'{"alpha": 0.5,', 400, "JSON"),
        (b"\xff\xfe\x00garbage", 400, "JSON"),
        (b"", 400, "JSON"),
        (json.dumps({**ORIGINAL, "pad": "x" * 5000}).encode(), 413, "body"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(server, body, status: int, field: str) -> None:
    answer = post(server, body)
    assert answer.status_code == status, answer.text
    assert field in answer.json()["detail"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_paths = st.sampled_from(
    [
        "alpha",
        "num_inference_steps",
        "seed_image_id",
        "mask_image_id",
        "format",
        "start",
        "end",
        *(
            f"{e}.{k}"
            for e in ("start", "end")
            for k in ("prompt", "seed", "negative_prompt", "denoising", "guidance")
        ),
    ]
)
_bodies = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    st.tuples(_paths, _json | st.just(_with)).map(lambda pv: json.dumps(_with(*pv)).encode()),
    st.binary(max_size=200),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
def test_fuzzed_bodies_never_get_a_500(server, body: bytes) -> None:
    answer = post(server, body)
    assert answer.status_code in (200, 400, 413, 422), answer.text
    if answer.status_code != 200:
        assert isinstance(answer.json()["detail"], str)


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
    exported = load(artifacts=tiny_export[0], backend="onnxruntime")
    with pytest.raises(RiffusionError, match="export with a larger --max-batch"):
        create_app(exported, ServerConfig(max_batch=exported.shape.max_batch + 1))


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
    assert err.strip().count("\n") == 0 and "max_queue" in err
    # The cluster's options: one line each, before Ray starts or anything is exported.
    for argv, message in (
        (("--replicas", "2"), "--replicas is an option of --ray"),
        (("--ray", "--replicas", "2", "--max-replicas", "3"), "--replicas is a fixed count"),
        (("--ray", "--max-ongoing-requests", "0"), "max_ongoing_requests out of range"),
        (("--ray", "--backend", "torch"), "the torch backend runs from a model source"),
    ):
        code, _, err = run_cli("serve", "--model", "random:tiny", *argv)
        assert code == 2 and message in err and err.strip().count("\n") == 0, err


# -- seed images and masks -----------------------------------------------------------


@pytest.mark.parametrize("seed_id", list(SEED_AUDIO))
def test_seed_images_are_spectrograms_of_their_audio(seed_id: str) -> None:
    """Each seed image is its audio in Riffusion's image format, as the original's rules
    (mel, power 0.25, inversion, flip) re-implemented with librosa draw it."""
    from riffusion_engine.engine.tools.reference import original_image_pixels

    params = SpectrogramParams()
    image = seed_image(seed_id)
    assert (image.size, image.mode) == ((512, 512), "RGB")
    audio = SEED_AUDIO[seed_id](5.11, params.sample_rate)
    expected = original_image_pixels(audio, params)
    diff = np.abs(np.asarray(image, dtype=int) - expected.astype(int))
    assert (diff <= 1).mean() >= 0.99
    assert np.asarray(image).std() > 10  # not blank


@pytest.mark.parametrize(("mask_id", "value"), [("mask_top_third_75", 0.75), ("mask_top_third_95", 0.95)])
def test_top_third_masks_regenerate_the_top_third_only(mask_id: str, value: float) -> None:
    pixels = np.asarray(mask_image(mask_id))
    assert (pixels[:170] == round(255 * value)).all()
    assert (pixels[171:] == 0).all()


def test_every_mask_is_a_grayscale_strength_map() -> None:
    for mask_id in MASKS:
        image = mask_image(mask_id)
        assert (image.size, image.mode) == ((512, 512), "L")
        pixels = np.asarray(image)
        assert pixels.max() > 0 and pixels.min() < 255


def test_a_directory_adds_and_overrides_ids(tmp_path: Path) -> None:
    Image.new("RGB", (512, 512), (10, 20, 30)).save(tmp_path / "og_beat.png")
    Image.new("L", (512, 512), 200).save(tmp_path / "my_mask.png")
    (tmp_path / "bad name.png").write_bytes(b"not a png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    library = SeedLibrary(tmp_path)
    assert "my_mask" in library and "og_beat" in library and "bad name" not in library
    assert np.asarray(library.get("og_beat"))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(library.get("my_mask"))[0, 0] == 200
    with pytest.raises(RiffusionError, match="not a readable PNG"):
        library.get("broken")
    with pytest.raises(RiffusionError, match="unknown id"):
        library.get("../og_beat")
    with pytest.raises(RiffusionError, match="does not exist"):
        SeedLibrary(tmp_path / "missing")
    assert os.path.exists(tmp_path / "og_beat.png")


# -- first contact: browsers calling directly, over-limit bodies ------------------------


@pytest.mark.parametrize("origins", [(), ("http://localhost:3000",), ("*",)])
def test_cors_is_closed_by_default_and_open_to_the_named_origins(torch_engine, origins) -> None:
    page = "http://localhost:3000"
    preflight_headers = {
        "Origin": page,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with running(torch_engine, max_steps=8, batch_window_ms=0, cors_origins=origins) as url:
        preflight = httpx.options(url + "/run_inference/", headers=preflight_headers, timeout=30)
        actual = post(url, ORIGINAL, headers={"Origin": page, "Content-Type": "application/json"})
    assert actual.status_code == 200  # a non-browser client is served either way
    allowed = actual.headers.get("access-control-allow-origin")
    if not origins:
        assert preflight.status_code == 405 and allowed is None
        return
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] in (page, "*")
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert allowed in (page, "*")
    with running(torch_engine, cors_origins=origins) as url:
        other = httpx.options(
            url + "/run_inference/",
            headers={**preflight_headers, "Origin": "http://evil.example"},
            timeout=30,
        )
    if origins == ("*",):
        assert other.headers.get("access-control-allow-origin") == "*"
    else:
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_bad_cors_origins_are_refused() -> None:
    for origin in ("localhost:3000", "http://x/path", "ftp://x", ""):
        with pytest.raises(RiffusionError, match="CORS origin"):
            ServerConfig(cors_origins=(origin,))


def test_a_client_that_sends_the_whole_body_first_reads_the_413(torch_engine) -> None:
    """http.client writes the whole body before reading the answer: the server reads and
    drops an over-limit body (up to 4x the limit) so the client gets the 413, not a reset
    connection (a socket closed with unread data answers with a reset)."""
    import http.client
    from urllib.parse import urlsplit

    limit = 256 * 1024
    body = json.dumps({**ORIGINAL, "pad": "x" * (3 * limit)}).encode()  # 3x the limit, past socket buffers
    with running(torch_engine, max_steps=8, batch_window_ms=0, max_body_bytes=limit) as url:
        host = urlsplit(url)
        for chunked in (False, True):
            connection = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
            try:
                if chunked:  # no Content-Length: the size is found while reading
                    parts = [body[i : i + 65536] for i in range(0, len(body), 65536)]
                    connection.request("POST", "/run_inference/", body=iter(parts), encode_chunked=True)
                else:
                    connection.request("POST", "/run_inference/", body=body)
                answer = connection.getresponse()
                assert answer.status == 413
                assert f"over the limit of {limit}" in json.loads(answer.read())["detail"]
                assert answer.getheader("connection") == "close"
            finally:
                connection.close()
        assert post(url, ORIGINAL).status_code == 200  # the server is fine afterwards


# -- overload: degrade instead of refusing -------------------------------------------------


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


def test_left_out_steps_follow_the_cap(server) -> None:
    """A request without num_inference_steps runs the API's default (50) or, where the
    server caps steps lower, the cap; the schema says so."""
    body = {k: v for k, v in ORIGINAL.items() if k != "num_inference_steps"}
    answer = post(server, body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-inference-steps"] == "8" and "x-requested-steps" not in answer.headers
    schema = httpx.get(server + "/openapi.json").json()
    body_schema = schema["paths"]["/run_inference/"]["post"]["requestBody"]["content"]["application/json"]
    steps = body_schema["schema"]["properties"]["num_inference_steps"]
    assert (steps["default"], steps["maximum"]) == (8, 8)
    assert "got 9" in post(server, {**ORIGINAL, "num_inference_steps": 9}).json()["detail"]
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


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
