"""``/stream`` under generated message sequences (hypothesis): the documented messages,
valid and mutated (wrong types, missing fields, unknown types, binary frames, oversize
text, control out of order), ending in ``stop`` or a dropped connection. Properties: no
socket closes with 1011 (a server error); each closes within 5 s of its ``stop``; the open
streams return to 0; the process's memory stays bounded; a valid ``/run_inference/``
answers 200 afterwards. The default run is about a minute; ``-m slow`` runs thousands."""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from riffusion_engine.engine.serve.app import background, create_app  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

STOPPED_WITHIN_S = 5.0

text = st.text(max_size=40)
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
prompt = st.fixed_dictionaries(
    {"prompt": st.sampled_from(["jazz", "techno", "lofi"]), "seed": st.integers(0, 2**20)},
    optional={"guidance": st.floats(0, 10), "denoising": st.floats(0, 1)},
)
# The documented messages, valid: cheap clips (1 step, 256 px on random:tiny).
valid = st.one_of(
    st.builds(
        lambda start, width, audio: {
            "type": "start",
            "start": start,
            "num_inference_steps": 1,
            "width": width,
            **audio,
        },
        prompt,
        st.sampled_from([256, 512]),
        st.sampled_from([{}, {"format": "opus"}, {"format": "opus", "bitrate": 32000}]),
    ),
    st.builds(
        lambda p, when: {"type": "prompt", "prompt": p, "when": when},
        prompt,
        st.sampled_from(["wrap", "now", "jump"]),
    ),
    st.builds(lambda p: {"type": "update", "end": p}, prompt),
    st.builds(lambda n: {"type": "played", "clip": n}, st.integers(-2, 50)),
    st.sampled_from([{"type": "pause"}, {"type": "resume"}]),
)


def mutate(message: dict[str, Any], draw: Any) -> Any:
    """A message with one field dropped, or given a value of any type, or its type renamed."""
    how = draw(st.sampled_from(["drop", "retype", "rename"]))
    key = draw(st.sampled_from(sorted(message)))
    out = dict(message)
    if how == "drop":
        del out[key]
    elif how == "retype":
        out[key] = draw(anything)
    else:
        out["type"] = draw(text)
    return out


@st.composite
def frames(draw: Any) -> list[Any]:
    """One socket's frames: JSON texts (valid or mutated), binary frames, non-JSON text,
    oversize text; then ("stop" | "drop")."""
    out: list[Any] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["valid", "valid", "mutated", "binary", "garbage", "oversize"]))
        if kind == "valid":
            out.append(json.dumps(draw(valid)))
        elif kind == "mutated":
            out.append(json.dumps(mutate(draw(valid), draw)))
        elif kind == "binary":
            out.append(draw(st.binary(max_size=64)))
        elif kind == "garbage":
            out.append(draw(text))
        else:
            out.append(json.dumps({"type": "played", "clip": 0, "pad": "x" * 1_000_000}))
    out.append(draw(st.sampled_from(["stop", "drop"])))
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_streams(url: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("riffusion_streams_open "):
            return float(line.split()[1])
    raise AssertionError("no riffusion_streams_open in /metrics")


def fuzz(torch_engine: Any, examples: int) -> None:
    import httpx

    config = ServerConfig(max_streams=4, stream_buffer=2, stream_start_timeout_s=5.0)
    app = create_app(torch_engine, config)
    with background(app) as url:
        ws_url = url.replace("http://", "ws://") + "/stream"
        codes: list[int] = []

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(frames())
        def one(sequence: list[Any]) -> None:
            with connect(ws_url, max_size=None, open_timeout=30) as ws:
                try:
                    for frame in sequence[:-1]:
                        ws.send(frame)
                    if sequence[-1] == "drop":
                        return
                    ws.send(json.dumps({"type": "stop"}))
                except ConnectionClosed as closed:  # closed by the server meanwhile (1008, 1013)
                    assert closed.rcvd is None or closed.rcvd.code != 1011, closed.rcvd
                    return
                stopped = time.monotonic()
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        ws.recv(timeout=STOPPED_WITHIN_S)
                assert time.monotonic() - stopped <= STOPPED_WITHIN_S
                code = closed.value.rcvd.code if closed.value.rcvd is not None else None
                codes.append(code)
                assert code != 1011, closed.value.rcvd

        before = rss_mib()
        one()
        deadline = time.monotonic() + 30
        while open_streams(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_streams(url) == 0
        assert 1000 in codes  # some sequences were heard to their stop
        # Streams come and go: what one process holds after many is bounded (peak growth).
        assert rss_mib() - before < 1024
        body = {
            "alpha": 0.25,
            "num_inference_steps": 2,
            "seed_image_id": "og_beat",
            "start": {"prompt": "church bells", "seed": 42},
            "end": {"prompt": "jazz", "seed": 123},
        }
        assert httpx.post(url + "/run_inference/", json=body, timeout=120).status_code == 200


def test_the_stream_protocol_under_generated_sequences(torch_engine) -> None:
    fuzz(torch_engine, examples=100)


@pytest.mark.slow
def test_the_stream_protocol_under_thousands_of_sequences(torch_engine) -> None:
    fuzz(torch_engine, examples=2000)
