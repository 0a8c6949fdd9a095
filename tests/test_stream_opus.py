"""Opus on ``/stream``: real decoders (PyAV's libopus in the listener, WebCodecs in
Chromium: tests/test_stream_server.py) against the PCM stream of the same start, and the
stream's encoder against a one-shot resampling of the PCM it was given."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("av")
soxr = pytest.importorskip("soxr")

from riffusion_engine.engine.stream.opus import (  # noqa: E402
    ENCODER_DELAY,
    RATE,
    OpusStream,
    opus_decoder,
    pack,
    unpack,
)
from riffusion_engine.engine.tools.listener import Listener, against_pcm  # noqa: E402
from riffusion_engine.kernels.params import SpectrogramParams  # noqa: E402


class Decoder:
    """The protocol's client side, on its own: a new libopus decoder at each pre_skip."""

    def __init__(self) -> None:
        self.out: list[np.ndarray] = []
        self.decoder: Any = None
        self.skip = 0
        self.rest = np.zeros(0, np.float32)

    def frame(self, fields: dict[str, Any], frame: bytes) -> None:
        import av

        if fields.get("pre_skip") is not None:
            self.decoder, self.skip, self.rest = opus_decoder(1), fields["pre_skip"], np.zeros(0, np.float32)
        got = [self.rest]
        for packet in unpack(frame):
            for out in self.decoder.decode(av.Packet(packet)):
                y = out.to_ndarray().reshape(-1).astype(np.float32)
                drop = min(self.skip, len(y))
                self.skip -= drop
                got.append(y[drop:])
        y = np.concatenate(got)
        assert len(y) >= fields["decoded"]
        self.out.append(y[: fields["decoded"]])
        self.rest = y[fields["decoded"] :]

    def drop_after(self, keep: int) -> None:
        del self.out[keep + 1 :]


def music(seconds: float, rate: int = 44100, seed: int = 0) -> np.ndarray:
    """A test signal with tones, a glide and noise: int16 (1, samples)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    x = 0.25 * np.sin(2 * np.pi * 220 * t * (1 + 0.05 * np.sin(1.3 * t))) + 0.1 * np.sin(2 * np.pi * 1760 * t)
    x += 0.03 * rng.standard_normal(len(t))
    return (x * 32767).astype(np.int16)[None]


def encode(
    opus: OpusStream, index: int, audio: np.ndarray, final: bool = False
) -> tuple[dict[str, Any], bytes]:
    e = opus.encode(index, audio, final=final)
    return {"decoded": e.decoded, "pre_skip": e.pre_skip, "samples": e.samples}, pack(e.packets)


def test_the_encoders_packets_decode_to_the_resampled_pcm_through_a_rewind() -> None:
    """Chunks of uneven lengths, a rewind that drops two and different audio after it: the
    decoded audio is the one-shot soxr resampling of the PCM kept (its length exactly,
    its mel spectrogram within 5 %), and neither the chunk joins nor the rewind's seam
    jump more than the audio's own steps."""
    params = SpectrogramParams()
    cuts = [0, 20_000, 123_635, 227_270, 330_905]
    a = music(9.0)
    # the audio made again after the rewind: another loudness, continuous at the seam
    t = np.arange(a.shape[-1]) - cuts[2]
    b = (a * (0.6 + 0.4 * np.cos(2 * np.pi * t / 44100))).astype(np.int16)
    opus, client = OpusStream(44100, 1, 96_000), Decoder()
    for i in range(4):
        fields, frame = encode(opus, i, a[:, cuts[i] : cuts[i + 1]])
        assert (fields["pre_skip"] is not None) == (i == 0) and fields["pre_skip"] in (None, ENCODER_DELAY)
        client.frame(fields, frame)
    opus.rewind(1)
    client.drop_after(1)
    seam = sum(len(o) for o in client.out)
    after = [b[:, cuts[2] : cuts[3]], b[:, cuts[3] : cuts[4]], b[:, 330_905:340_000]]
    for i, chunk in enumerate(after, start=2):
        fields, frame = encode(opus, i, chunk, final=i == 4)
        assert (fields["pre_skip"] is not None) == (i == 2)
        client.frame(fields, frame)
    pcm = np.concatenate([a[:, : cuts[2]], *after], axis=-1)
    decoded = np.concatenate(client.out)[None]  # int16's scale
    assert decoded.shape[-1] == round(pcm.shape[-1] * RATE / 44100)  # the length law at 48 kHz
    joins = cuts[1:]
    found = against_pcm(decoded, pcm, params, joins)
    assert found["spectral_convergence"] < 0.05, found
    assert found["join_jump_max"] <= found["pcm_step_p999"], found
    assert abs(decoded[0, seam] - decoded[0, seam - 1]) <= found["pcm_step_p999"]


def test_a_rewind_to_before_the_first_chunk_starts_again_and_bad_values_are_refused() -> None:
    from riffusion_engine.kernels.errors import RiffusionError

    opus, client = OpusStream(44100, 1, 64_000), Decoder()
    client.frame(*encode(opus, 0, music(1.0)))
    opus.rewind(-1)
    client.drop_after(-1)
    audio = music(2.0, seed=3)
    fields, frame = encode(opus, 0, audio, final=True)
    assert fields["pre_skip"] == ENCODER_DELAY
    client.frame(fields, frame)
    assert len(np.concatenate(client.out)) == round(audio.shape[-1] * RATE / 44100)
    for bad in (8000, 300_000, 96_000.0, True):
        with pytest.raises(RiffusionError, match="bitrate must be an integer from 16000 to 256000"):
            OpusStream(44100, 1, bad)
    with pytest.raises(RiffusionError, match="runs past its end"):
        unpack(b"\x05\x00abc")
    # A rewind past the chunks kept is the caller's defect, not a user's error.
    short = OpusStream(44100, 1, 64_000, keep=2)
    for i in range(4):
        short.encode(i, music(0.5, seed=i))
    with pytest.raises(RuntimeError, match="cannot rewind to chunk 0"):
        short.rewind(0)


# -- through the server ----------------------------------------------------------------------

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("websockets")

from riffusion_engine.engine.serve.app import background, create_app  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from websockets.sync.client import connect  # noqa: E402


@pytest.fixture(scope="module")
def server(torch_engine):
    app = create_app(torch_engine, ServerConfig(max_streams=2, stream_buffer=2))
    with background(app) as url:
        yield url.replace("http://", "ws://") + "/stream"


def start(**fields: Any) -> dict[str, Any]:
    return {
        "type": "start",
        "start": {"prompt": "jazz", "seed": 1},
        "num_inference_steps": 3,
        "width": 256,
        **fields,
    }


def listen(url: str, clips: int, **fields: Any) -> Listener:
    """A stream of ``clips`` clips and its tail, heard by the listener."""
    with connect(url) as ws:
        listener = Listener(ws)
        listener.send(start(**fields))
        assert listener.next_event()["type"] == "ready"
        while sum(e["type"] == "clip" for e, _ in listener.clips) < clips:
            listener.next_clip()
        listener.send({"type": "stop"})
        while listener.clips[-1][0]["type"] != "tail":
            listener.next_clip()
    return listener


def audio(listener: Listener) -> np.ndarray:
    return np.concatenate([np.frombuffer(a, "<i2") for _, a in listener.clips]).astype(np.float32)[None]


def test_the_listener_decodes_the_opus_stream_to_the_pcm_streams_audio(server, torch_engine) -> None:
    """The same start as PCM and as Opus: the decoded Opus has the PCM stream's length at
    48 kHz, its mel spectrogram within 5 % and no join jump above the PCM's own steps,
    at a sixth of its bytes or less; the ready event says what is sent."""
    pcm_listener = listen(server, 3)
    opus_listener = listen(server, 3, format="opus")
    ready = next(e for e in opus_listener.events if e["type"] == "ready")
    assert {k: ready[k] for k in ("format", "sample_rate", "channels", "bitrate")} == {
        "format": "opus",
        "sample_rate": RATE,
        "channels": 1,
        "bitrate": 104_000,  # the server's --stream-opus-kbps default
    }
    events = [e for e, _ in opus_listener.clips]
    assert events[0]["pre_skip"] == ENCODER_DELAY and not any("pre_skip" in e for e in events[1:])
    pcm, decoded = audio(pcm_listener), audio(opus_listener)
    # Clips made ahead differ between the two streams: compare what both hold before a tail.
    n = min(len(pcm_listener.clips), len(opus_listener.clips)) - 1
    ends = np.cumsum([len(a) // 2 for _, a in pcm_listener.clips[:n]])
    clip_samples = round(next(e for e in pcm_listener.events if e["type"] == "ready")["clip_s"] * 44100)
    overlap = round(pcm_listener.events[0]["overlap_s"] * 44100)
    total = len(events) - 1
    assert decoded.shape[-1] == round((total * clip_samples - (total - 1) * overlap) * RATE / 44100)
    # the decoded audio through clip n - 1's chunk: what both streams share
    shared = ends[-1]
    found = against_pcm(
        decoded[:, : round(shared * RATE / 44100)], pcm[:, :shared], torch_engine.params, list(ends[:-1])
    )
    assert found["spectral_convergence"] <= 0.05, found
    assert found["join_jump_max"] <= found["pcm_step_p999"], found
    report, pcm_report = opus_listener.report(), pcm_listener.report()
    assert report["bytes_per_s"] <= pcm_report["bytes_per_s"] / 6, (report, pcm_report)
    assert pcm_report["bytes_per_s"] == pytest.approx(44100 * 2, rel=0.001)


def test_bad_format_and_bitrate_are_error_events_naming_the_field(server) -> None:
    with connect(server) as ws:
        for fields, field in (
            ({"format": "mp3"}, "format"),
            ({"format": "opus", "bitrate": 8000}, "bitrate"),
            ({"format": "opus", "bitrate": 1_000_000}, "bitrate"),
            ({"format": "opus", "bitrate": "96k"}, "bitrate"),
            ({"bitrate": 96_000}, "bitrate"),  # PCM takes none
        ):
            ws.send(json.dumps(start(**fields)))
            event = json.loads(ws.recv(timeout=60))
            assert event["type"] == "error" and event["field"] == field, (fields, event)
        ws.send(json.dumps(start(format="opus", bitrate=32_000)))
        ready = json.loads(ws.recv(timeout=60))
        assert ready["type"] == "ready" and ready["bitrate"] == 32_000


def test_a_reconnect_decodes_from_its_first_frame(server) -> None:
    """A listener leaves mid-stream (no stop) and comes back: its new stream's first frame
    starts an encoder run, and it decodes to the length law."""
    with connect(server) as ws:
        first = Listener(ws)
        first.send(start(format="opus"))
        first.next_clip()
        first.next_clip()
    again = listen(server, 2, format="opus")
    events = [e for e, _ in again.clips]
    assert events[0]["index"] == 0 and events[0]["pre_skip"] == ENCODER_DELAY
    assert sum(e["decoded"] for e in events) == sum(e["samples"] for e in events)
    assert audio(again).shape[-1] == sum(e["samples"] for e in events)


def test_a_steer_rewinds_the_encoded_audio_as_it_rewinds_pcm(server) -> None:
    """Steering now drops clips already sent: the next frame starts a new encoder run, and
    the audio kept decodes to the length law across the change with no jump at the seam."""
    with connect(server) as ws:
        listener = Listener(ws)
        listener.send(start(format="opus"))
        ready = listener.next_event()
        while 1 not in listener.begins or time.monotonic() < listener.begins[1]:
            listener.next_clip()
        listener.steer({"prompt": "techno", "seed": 9}, "now")
        while not any(e["type"] == "rewind" for e in listener.events):
            listener.next_event()
        after = next(e for e in listener.events if e["type"] == "rewind")["after"]
        event = listener.next_clip()
        listener.send({"type": "stop"})
        while listener.clips[-1][0]["type"] != "tail":
            listener.next_clip()
    assert event["index"] == after + 1 and event["pre_skip"] > ENCODER_DELAY  # the pre-roll, dropped
    events = [e for e, _ in listener.clips]
    assert [e["index"] for e in events] == [*range(len(events) - 1), events[-2]["index"]]
    decoded = audio(listener)[0]
    clip, overlap = round(ready["clip_s"] * 44100), round(ready["overlap_s"] * 44100)
    clips = len(events) - 1
    assert len(decoded) == round((clips * clip - (clips - 1) * overlap) * RATE / 44100)
    seam = sum(e["decoded"] for e in events[: after + 1])
    own = np.percentile(np.abs(np.diff(decoded)), 99.9)
    assert abs(decoded[seam] - decoded[seam - 1]) <= own
