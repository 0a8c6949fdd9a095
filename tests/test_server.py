"""The HTTP server on random:tiny: a real uvicorn server on a loopback port and a real
HTTP client. The oracle for every answer is the engine run directly on the request
the original API describes."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from riffusion_engine.engine.runtime.pipeline import Engine  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402
from riffusion_engine.engine.runtime.seeds import mask_image, seed_image  # noqa: E402
from riffusion_engine.engine.serve.app import background, create_app  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402

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
@pytest.mark.long
def test_fuzzed_bodies_never_get_a_500(server, body: bytes) -> None:
    answer = post(server, body)
    assert answer.status_code in (200, 400, 413, 422), answer.text
    if answer.status_code != 200:
        assert isinstance(answer.json()["detail"], str)


# -- first contact: browsers calling directly, over-limit bodies ------------------------


@pytest.mark.parametrize(
    "origins", [(), ("http://localhost:3000",), pytest.param(("*",), marks=pytest.mark.long)]
)
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
    drops an over-limit body (for up to 10 s and 64 MiB) so the client gets the 413, not a
    reset connection (a socket closed with unread data answers with a reset). 5 MB
    against the default 64 KiB limit: 80 times it, far past the socket buffers."""
    import http.client
    from urllib.parse import urlsplit

    limit = ServerConfig().max_body_bytes
    body = json.dumps({**ORIGINAL, "pad": "x" * 5_000_000}).encode()
    with running(torch_engine, max_steps=8, batch_window_ms=0) as url:
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


# -- steps left out


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
