"""``/stream`` through real clients: the ``websockets`` client library and the player page
in a headless Chromium driven by Playwright. Oracles: the engine's one-shot run of the
request each clip event describes, the protocol's documented bounds, the page's own
AudioContext."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")

from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402
from riffusion_engine.engine.runtime.seeds import seed_image  # noqa: E402
from riffusion_engine.engine.serve.app import background, create_app  # noqa: E402
from riffusion_engine.engine.serve.config import ServerConfig  # noqa: E402
from riffusion_engine.engine.tools.listener import Listener  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(torch_engine):
    """A server over random:tiny: two streams at most, two clips ahead of playback."""
    app = create_app(torch_engine, ServerConfig(max_streams=2, stream_buffer=2, max_steps=1000))
    with background(app) as url:
        yield url, app


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/stream"


def start(prompt: str = "jazz", **fields: Any) -> str:
    return json.dumps(
        {"type": "start", "start": {"prompt": prompt, "seed": 1}, "num_inference_steps": 3, **fields}
    )


def receive(ws: Any, *, played: bool = True, timeout: float = 120) -> tuple[dict[str, Any], bytes | None]:
    """The next event (skipping none) and, for clip and tail events, their audio frame;
    tells the server the clip began playing unless ``played`` is False."""
    event = json.loads(ws.recv(timeout=timeout))
    audio = None
    if event["type"] in ("clip", "tail"):
        audio = ws.recv(timeout=timeout)
        assert isinstance(audio, bytes)
        if played and event["type"] == "clip":
            ws.send(json.dumps({"type": "played", "clip": event["index"]}))
    return event, audio


def clip_events(ws: Any, count: int, **kwargs: Any) -> list[tuple[dict[str, Any], bytes]]:
    out = []
    while len(out) < count:
        event, audio = receive(ws, **kwargs)
        if event["type"] == "clip":
            out.append((event, audio))
    return out


def metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


@pytest.mark.long
def test_the_stream_sends_the_one_shot_clips_joined(server, torch_engine) -> None:
    url, _ = server
    with connect(ws_url(url)) as ws:
        ws.send(start(alpha_step=0.5))
        ready, _ = receive(ws)
        assert ready["type"] == "ready" and ready["format"] == "pcm_s16le" and ready["sample_rate"] == 44100
        overlap = round(ready["overlap_s"] * 44100)
        clips = clip_events(ws, 3)
        ws.send(json.dumps({"type": "stop"}))
        rest = [receive(ws) for _ in range(2)]
    assert [e["alpha"] for e, _ in clips] == [0.0, 0.5, 1.0]
    assert rest[-1][0] == {"type": "stopped", "reason": "stopped by the client"}
    beat = seed_image("og_beat", torch_engine.params)
    for event, audio in clips:
        assert event["image"].startswith("data:image/jpeg;base64,")
        start_, end = (PromptInput(**{k: v for k, v in event[n].items()}) for n in ("start", "end"))
        request = Request(start_, end, event["alpha"], steps=3, width=512, seed_image=beat)
        (alone,) = torch_engine.run([request])
        pcm = np.frombuffer(audio, dtype="<i2")
        # The chunk is the clip less its held tail, its head crossfaded with the previous tail.
        assert np.array_equal(pcm[overlap:], alone.audio[0, overlap:-overlap])
        if event["index"] == 0:
            assert np.array_equal(pcm[:overlap], alone.audio[0, :overlap])
    assert [e["start_s"] for e, _ in clips] == pytest.approx([0, 4.91, 9.82])


@pytest.mark.long
def test_bad_control_messages_are_error_events_and_the_stream_goes_on(server) -> None:
    url, _ = server
    with connect(ws_url(url)) as ws:
        for bad, field in (
            ("not json", "message"),
            (json.dumps({"type": "dance"}), "type"),
            (json.dumps({"type": "prompt", "prompt": {"prompt": "x", "seed": 1}}), "type"),  # before start
            (start(alpha_step=2), "alpha_step"),
            (start(num_inference_steps=5000), "num_inference_steps"),
            (start(seed_image_id="nope"), "seed_image_id"),
            (start(prompt=""), "start.prompt"),
        ):
            ws.send(bad)
            event, _ = receive(ws)
            assert event["type"] == "error" and event["field"] == field, (bad, event)
        ws.send(start())
        assert receive(ws)[0]["type"] == "ready"
        for bad, field in (
            (json.dumps({"type": "prompt", "prompt": {"prompt": "x", "seed": -1}}), "prompt.seed"),
            (
                json.dumps({"type": "prompt", "prompt": {"prompt": "x", "seed": 1, "guidance": "7"}}),
                "prompt.guidance",
            ),
            (json.dumps({"type": "update", "seed_image_id": "../etc"}), "seed_image_id"),
            (start(), "type"),
            (json.dumps({"type": "played", "clip": -3}), "clip"),
        ):
            ws.send(bad)
            event, _ = receive(ws)
            while event["type"] != "error":  # clips keep coming meanwhile
                event, _ = receive(ws)
            assert event["field"] == field, (bad, event)
        ws.send(json.dumps({"type": "prompt", "prompt": {"prompt": "techno", "seed": 9}}))
        ends = [e["end"]["prompt"] for e, _ in clip_events(ws, 7)]
        assert "techno" in ends  # the queued prompt became the end at a wrap


def test_now_reaches_the_ear_without_a_gap(server) -> None:
    """A listener steers now after clip 1 began: the clips after it, sent or not, are made
    again toward the prompt; the first of them carries prompt_to_ear_s, which agrees with
    the listener's own clock; the audio kept has the length law and no jump at a join."""
    url, _ = server
    no_streams(url)
    before = metric(url, "riffusion_stream_prompt_to_ear_seconds_count")
    with connect(ws_url(url)) as ws:
        ws.send(start(width=256))
        listener = Listener(ws)
        ready = listener.next_event()
        assert ready["type"] == "ready" and ready["width"] == 256 and ready["clip_s"] == pytest.approx(2.55)
        event = listener.next_clip()
        while 1 not in listener.begins or time.monotonic() < listener.begins[1]:
            event = listener.next_clip()  # until clip 1 plays; the server has made clips ahead
        reaction = listener.steer({"prompt": "techno", "seed": 9}, "now")
        while "prompt_to_ear_s" not in event:
            event = listener.next_clip()
        first = event
        for _ in range(2):
            listener.next_clip()
        time.sleep(max(0.0, listener.begins[first["index"]] - time.monotonic()) + 0.2)
        listener.tell()  # the first clip toward techno began: the histogram has it
        listener.send({"type": "stop"})
        while listener.clips[-1][0]["type"] != "tail":
            listener.next_clip()
    events = [e for e, _ in listener.clips]
    assert [e["index"] for e in events] == [*range(len(events) - 1), events[-2]["index"]]
    assert first["end"]["prompt"] == "techno" and first["alpha"] == 0.25
    # The clips sent after the one playing were dropped (the client told first), so the
    # change is heard right after clip 1.
    rewinds = [e for e in listener.events if e["type"] == "rewind"]
    assert rewinds == [{"type": "rewind", "after": 1}] and first["index"] == 2 and listener.cuts == 0
    previous = events[first["index"] - 1]
    assert first["start"]["start"] == previous["start"] and first["start"]["end"] == previous["end"]
    assert first["start"]["alpha"] == previous["alpha"]
    assert reaction.index == first["index"]
    assert reaction.server_s == pytest.approx(reaction.client_s, abs=0.1)
    assert metric(url, "riffusion_stream_prompt_to_ear_seconds_count") == before + 1
    pcm = np.concatenate([np.frombuffer(a, dtype="<i2") for _, a in listener.clips]).astype(float)
    clip, overlap = round(ready["clip_s"] * 44100), round(ready["overlap_s"] * 44100)
    clips = len(events) - 1
    assert len(pcm) == clips * clip - (clips - 1) * overlap  # the length law, across the change
    own = np.percentile(np.abs(np.diff(pcm)), 99.9)
    ends = np.cumsum([len(a) // 2 for _, a in listener.clips[:-1]])
    assert max(abs(pcm[i] - pcm[i - 1]) for i in ends) <= own


def test_the_listener_reads_what_came_before_the_server_closed() -> None:
    """The server sends its tail and ``stopped``, then closes, while the listener still owes
    a ``played``: the listener reads the tail and the stop instead of failing on the send.
    The server here is a plain ``websockets`` one that closes as the stream server does."""
    from websockets.sync.server import serve

    clip = np.zeros(441, "<i2").tobytes()

    def handler(ws: Any) -> None:
        ws.send(json.dumps({"type": "ready", "sample_rate": 44100, "channels": 1}))
        for kind in ("clip", "tail"):
            ws.send(json.dumps({"type": kind, "index": 0 if kind == "clip" else 1}))
            ws.send(clip)
        ws.send(json.dumps({"type": "stopped", "reason": "stopped by the client"}))
        ws.close(1000, "stopped by the client")

    with serve(handler, "127.0.0.1", 0) as ws_server:
        threading.Thread(target=ws_server.serve_forever, daemon=True).start()
        port = ws_server.socket.getsockname()[1]
        with connect(f"ws://127.0.0.1:{port}") as ws:
            listener = Listener(ws)
            assert listener.next_event()["type"] == "ready"
            assert listener.next_clip()["type"] == "clip"  # it begins now: a played is owed
            time.sleep(0.5)  # the close frame has arrived
            assert listener.next_clip()["type"] == "tail"
            assert listener.next_event()["type"] == "stopped"


def test_steering_and_width_errors_name_the_field_and_the_stream_goes_on(tiny_export) -> None:
    """Over an export (widths 256..1024): a bad when, a width off the 8-pixel grid, below
    the export's profile or over the seed image, and now before start are error events."""
    from riffusion_engine import load

    engine = load(artifacts=tiny_export[0], backend="onnxruntime")
    app = create_app(engine, ServerConfig(max_steps=1000))
    techno = {"prompt": "techno", "seed": 9}
    with background(app) as url, connect(ws_url(url)) as ws:
        for bad, field, says in (
            (json.dumps({"type": "prompt", "prompt": techno, "when": "now"}), "type", "start message"),
            (start(width=260), "width", "multiple of 8"),
            (start(width=128), "width", "256..1024 pixels (export with --width 128 for shorter clips)"),
            # wider than og_beat (512 pixels): no export flag could help, and none is named
            (start(width=1040), "width", "wider than the seed image 'og_beat' (512 pixels)"),
            (start(width=10**9), "width", "wider than the seed image 'og_beat' (512 pixels)"),
            (start(width=8.5), "width", "integer"),
        ):
            ws.send(bad)
            event, _ = receive(ws)
            assert event["type"] == "error" and event["field"] == field and says in event["message"], (
                bad,
                event,
            )
        ws.send(start(width=256))
        assert receive(ws)[0]["type"] == "ready"
        ws.send(json.dumps({"type": "prompt", "prompt": techno, "when": "soon"}))
        event, _ = receive(ws)
        while event["type"] != "error":
            event, _ = receive(ws)
        assert event["field"] == "when" and "'wrap', 'now' or 'jump'" in event["message"]
        ws.send(json.dumps({"type": "prompt", "prompt": techno, "when": "jump"}))
        ends = [e["end"]["prompt"] for e, _ in clip_events(ws, 3)]
        assert "techno" in ends


def no_streams(url: str) -> None:
    """Wait for the streams of earlier tests to wind down (a closed client's stream ends
    at the server once its current step has run)."""
    deadline = time.monotonic() + 60
    while metric(url, "riffusion_streams_open") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "riffusion_streams_open") == 0


def test_streams_over_the_limit_are_refused_with_a_reason(server) -> None:
    url, _ = server
    no_streams(url)
    with connect(ws_url(url)) as first, connect(ws_url(url)) as second:
        first.send(start())
        second.send(start())
        assert receive(first)[0]["type"] == receive(second)[0]["type"] == "ready"
        refused_before = metric(url, "riffusion_streams_refused_total")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            with connect(ws_url(url)) as third:
                third.recv(timeout=30)
        assert closed.value.rcvd.code == 1013 and "at most 2" in closed.value.rcvd.reason
        assert metric(url, "riffusion_streams_refused_total") == refused_before + 1
        assert metric(url, "riffusion_streams_open") == 2
    no_streams(url)


@pytest.mark.slow  # CI runs it (.ci/run); seconds of waiting
def test_a_client_that_never_reads_gets_a_bounded_stream(server) -> None:
    """A raw client that sends its start and then reads nothing (so it never says a clip
    played): the server makes its buffer's clips and no more."""
    url, _ = server

    def sent() -> float:
        return metric(url, "riffusion_stream_clips_total") - before

    before = metric(url, "riffusion_stream_clips_total")
    with connect(ws_url(url)) as ws:
        began = time.monotonic()
        ws.send(start())
        while sent() < 2 and time.monotonic() < began + 120:  # the buffer's two clips
            time.sleep(0.1)
        assert sent() == 2
        # Quiet for several clips' time (these two took this long): no third clip.
        time.sleep(max(4.0, 2 * (time.monotonic() - began)))
        assert sent() == 2


def test_a_played_report_of_a_clip_never_sent_is_an_error_event(server) -> None:
    """``played`` names a clip the client has: one above every clip sent is refused, naming
    ``clip``, and moves nothing (no credit for clips never sent, no behind events); a
    clip sent is taken."""
    url, _ = server
    no_streams(url)
    with connect(ws_url(url)) as ws:
        ws.send(start(width=256, num_inference_steps=1))
        assert receive(ws)[0]["type"] == "ready"
        ws.send(json.dumps({"type": "played", "clip": 10**12}))
        events: list[dict[str, Any]] = []
        while sum(e["type"] == "clip" for e in events) < 2 or not any(e["type"] == "error" for e in events):
            events.append(receive(ws, played=False)[0])
        (error,) = [e for e in events if e["type"] == "error"]
        assert error["field"] == "clip" and "clip 1000000000000 was never sent" in error["message"], error
        # Unplayed, the server sends its buffer (2 clips) and waits: the report gave no credit.
        with pytest.raises(TimeoutError):
            receive(ws, played=False, timeout=3)
        assert [e["index"] for e in events if e["type"] == "clip"] == [0, 1]
        assert not any(e["type"] == "behind" for e in events), events
        ws.send(json.dumps({"type": "played", "clip": 0}))
        event, _ = receive(ws, played=False)
        assert event["type"] == "clip" and event["index"] == 2, event
        ws.send(json.dumps({"type": "stop"}))


def test_a_disconnect_stops_the_work_at_the_next_step(server) -> None:
    """A stream whose clip takes ~1000 UNet steps; the client leaves while it denoises:
    a one-shot request right after is answered without waiting for that clip."""
    import httpx

    url, _ = server
    body = {
        "alpha": 0.0,
        "num_inference_steps": 2,
        "start": {"prompt": "a", "seed": 1},
        "end": {"prompt": "b", "seed": 2},
        "format": "wav",
    }
    begin = time.perf_counter()
    assert httpx.post(url + "/run_inference/", json=body, timeout=120).status_code == 200
    one_shot = time.perf_counter() - begin
    with connect(ws_url(url)) as ws:
        ws.send(start(num_inference_steps=1000, seed_image_id="og_beat"))
        assert receive(ws)[0]["type"] == "ready"
        time.sleep(1.0)  # denoising now
    begin = time.perf_counter()
    assert httpx.post(url + "/run_inference/", json=body, timeout=120).status_code == 200
    # 1000 steps of the tiny UNet at 512 px take tens of seconds; one step well under one.
    assert time.perf_counter() - begin < one_shot + 5.0


def test_sockets_that_never_start_hold_no_stream_slot(torch_engine) -> None:
    """Idle sockets and sockets sending only bad messages hold no stream slot and are closed
    (1008) after the start timeout; stop before start closes at once (1000); sockets
    waiting to start have their own bound (1013); meanwhile a real listener gets music."""
    from websockets.exceptions import ConnectionClosed

    config = ServerConfig(max_streams=1, stream_start_timeout_s=3.0, max_unstarted_streams=5)
    app = create_app(torch_engine, config)

    def closed(ws: Any) -> Any:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=15)
        return info.value.rcvd

    with background(app) as url, contextlib.ExitStack() as sockets:
        waiting = [sockets.enter_context(connect(ws_url(url))) for _ in range(3)]  # idle
        noisy = sockets.enter_context(connect(ws_url(url)))  # only bad messages
        for bad, field in (("not json", "message"), (json.dumps({"type": "played", "clip": 0}), "type")):
            noisy.send(bad)
            event, _ = receive(noisy)
            assert event["type"] == "error" and event["field"] == field
        extra = sockets.enter_context(connect(ws_url(url)))  # the fifth waiting: the bound
        with connect(ws_url(url)) as over:
            refused = closed(over)
            assert refused.code == 1013 and "waiting to start a stream: at most 5" in refused.reason
        extra.close()
        time.sleep(1.0)  # the server sees it leave
        with connect(ws_url(url)) as stopper:
            stopper.send(json.dumps({"type": "stop"}))
            event, _ = receive(stopper)
            assert event == {"type": "stopped", "reason": "stopped by the client before the stream started"}
            assert closed(stopper).code == 1000
        with connect(ws_url(url)) as listener:  # the one slot is free for a real start
            listener.send(start(width=256))
            assert receive(listener)[0]["type"] == "ready"
            assert clip_events(listener, 1)[0][0]["type"] == "clip"
            assert metric(url, "riffusion_streams_open") == 1
        for ws in [*waiting, noisy]:
            timed_out = closed(ws)
            assert timed_out.code == 1008 and timed_out.reason == "no valid start message within 3 s"
        no_streams(url)


def test_the_lifetime_ends_a_stream(torch_engine) -> None:
    app = create_app(torch_engine, ServerConfig(stream_lifetime_s=3.0))
    with background(app) as url, connect(ws_url(url)) as ws:
        ws.send(start())
        events = []
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            while True:
                events.append(receive(ws)[0])
    assert events[-1]["type"] == "stopped" and "lifetime of 3 s" in events[-1]["reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Any:
    """Headless Chromium (Debian's) with a fresh profile, closed and removed after."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM} (Debian's chromium package)"
)
def test_the_page_plays_the_stream_in_a_real_browser(server, tmp_path: Path) -> None:
    url, _ = server
    with chromium(tmp_path) as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/?steps=3&alpha_step=1&seed=5")
        page.click("#play")
        # Three clips in while the first plays (the server sends two ahead of it).
        page.wait_for_function("window.riffusionPlayer.clips >= 3", timeout=120_000)
        # The server's profile, as its ready event says it.
        assert page.inner_text("#profile") == "profile default: pndm, 3 steps, guidance 7"
        page.fill("#prompt", "dub techno with a choir")
        page.press("#prompt", "Enter")
        # Steering now drops the clips queued after the one playing.
        page.wait_for_function("window.riffusionPlayer.rewinds >= 1", timeout=120_000)
        played = page.evaluate("window.riffusionPlayer.samplesPlayed")
        page.wait_for_timeout(1500)
        state = page.evaluate("window.riffusionPlayer")
        assert state["samplesPlayed"] > played  # the AudioContext plays
        assert page.evaluate("document.querySelector('#behind') !== null")
        page.wait_for_function(
            "window.riffusionPlayer.events.some(e => e.end.prompt === 'dub techno with a choir')",
            timeout=120_000,
        )
        # The page steers now by default, at 256-pixel clips, and shows when the prompt was heard.
        assert page.evaluate("window.riffusionPlayer.width") == 256
        page.wait_for_function("window.riffusionPlayer.reactions.length >= 1", timeout=120_000)
        toward = page.evaluate(
            "window.riffusionPlayer.events.find(e => e.end.prompt === 'dub techno with a choir')"
        )
        assert toward["alpha"] == 1 and toward["prompt_to_ear_s"] > 0  # alpha_step 1: on its way, at once
        assert "heard" in page.inner_text("#now")
        assert not errors and not state["errors"], (errors, state["errors"])
        # Chromium decodes Opus (WebCodecs): each chunk scheduled is the samples its event
        # says it yields, in order through the rewind, with no jump where chunks meet.
        state = page.evaluate("window.riffusionPlayer")
        assert state["format"] == "opus" and "Opus at 104 kbit/s" in page.inner_text("#audio")
        assert state["bytesPerSecond"] < 44100 * 2 / 6  # a sixth of PCM's bytes or less
        events = {e["index"]: e for e in state["events"] if e["type"] == "clip"}  # the last of each
        chunks = state["chunks"]
        assert [c["index"] for c in chunks] == list(
            range(chunks[0]["index"], chunks[0]["index"] + len(chunks))
        )
        assert all(c["count"] == events[c["index"]]["decoded"] for c in chunks)
        own = _pcm_steps(url, prompt="a jazz pianist playing a concerto", seed=5)
        assert max(abs(b["first"] - a["last"]) for a, b in itertools.pairwise(chunks)) <= own
        # A width the server refuses: the page starts again at the seed image's. A browser
        # without WebCodecs asks for PCM.
        other = browser.new_page()
        other.add_init_script("delete window.AudioDecoder")
        other.goto(url + "/?steps=3&alpha_step=1&seed=6&width=100")
        other.click("#play")
        other.wait_for_function("window.riffusionPlayer.clips >= 1", timeout=120_000)
        assert other.evaluate("window.riffusionPlayer.width") == 512
        assert other.evaluate("window.riffusionPlayer.format") == "pcm_s16le"
        other.wait_for_function("document.querySelector('#audio').textContent.includes('16-bit PCM')")


def _pcm_steps(url: str, **prompt: Any) -> float:
    """The 99.9th percentile step between neighbouring samples (-1..1) of the PCM stream of
    the page's start, resampled to Opus's 48 kHz: the oracle of a chunk join's jump."""
    import soxr

    with connect(ws_url(url)) as ws:
        listener = Listener(ws)
        listener.send(
            json.loads(start(prompt["prompt"], alpha_step=1, width=256))
            | {"start": {**prompt, "denoising": 0.75}, "seed_image_id": "og_beat"}
        )
        for _ in range(3):
            listener.next_clip()
    pcm = np.concatenate([np.frombuffer(a, "<i2") for _, a in listener.clips]) / 32768
    return float(np.percentile(np.abs(np.diff(soxr.resample(pcm, 44100, 48000))), 99.9))


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM} (Debian's chromium package)"
)
def test_the_page_takes_the_servers_steps_and_recovers_after_a_refusal_or_a_close(
    torch_engine, tmp_path: Path
) -> None:
    """docs/serving.md's offline server (``--max-steps``): the page plays at the server's
    default steps; a URL asking for more is refused and said in words, with Play back;
    when the server stops (1012) the page says so, and Next prompt starts a new stream."""
    app = create_app(torch_engine, ServerConfig(max_steps=3, stream_buffer=1))
    with chromium(tmp_path) as browser:
        with background(app) as url:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/?alpha_step=1&seed=5")
            page.click("#play")
            page.wait_for_function("window.riffusionPlayer.clips >= 1", timeout=120_000)
            assert page.inner_text("#profile") == "profile default: pndm, 3 steps, guidance 7"
            refused = browser.new_page()
            refused.on("pageerror", lambda exc: errors.append(str(exc)))
            refused.goto(url + "/?steps=50&seed=6")
            refused.click("#play")
            refused.wait_for_function("window.riffusionPlayer.state === 'closed'", timeout=60_000)
            said = refused.inner_text("#status")
            assert "refused to start" in said and "num_inference_steps: at most 3 on this server" in said
            assert (
                refused.inner_text("#play") == "Play"
                and refused.evaluate("window.riffusionPlayer.clips") == 0
            )
        # The server stopped under the playing page.
        page.wait_for_function("window.riffusionPlayer.state === 'closed'", timeout=60_000)
        assert "the server stopped or is restarting (1012)" in page.inner_text("#status")
        assert page.inner_text("#play") == "Play"
        # Next prompt starts a stream again: here nothing listens any more, which it says.
        page.fill("#prompt", "dub techno")
        page.click("#send")
        page.wait_for_function(
            "document.querySelector('#status').textContent.includes('(1006)')", timeout=30_000
        )
        assert "could not be reached" in page.inner_text("#status") and page.inner_text("#play") == "Play"
        assert not errors, errors


def test_clips_due_soonest_run_first_and_share_batches(torch_engine) -> None:
    """The batcher's order: a stream's clip due in a second runs before a one-shot request
    that arrived earlier (due at its arrival plus the timeout); clips of two streams that
    share a shape run as one batch."""
    from riffusion_engine.engine.serve.batcher import Batcher

    batcher = Batcher(torch_engine, ServerConfig(max_batch=4, batch_window_ms=0, timeout_s=300))
    order: list[str] = []
    beat = seed_image("og_beat", torch_engine.params)
    one_shot = Request(PromptInput("a", 1), steps=2, width=256)
    clip = Request(PromptInput("b", 2), steps=3, width=512, seed_image=beat)
    other_stream = Request(PromptInput("c", 3), steps=3, width=512, seed_image=beat)
    job = batcher.submit(one_shot)
    job.future.add_done_callback(lambda f: order.append("one-shot"))
    now = time.monotonic()
    (first,) = batcher.submit_images([clip], [now + 1])
    (second,) = batcher.submit_images([other_stream], [now + 2])
    for name, j in (("stream b", first), ("stream c", second)):
        j.future.add_done_callback(lambda f, name=name: order.append(name))
    batcher.start()
    assert job.future.result(120).audio.shape[-1] > 0
    batcher.close()
    assert order[-1] == "one-shot" and set(order[:2]) == {"stream b", "stream c"}
    registry = batcher.metrics.registry
    # two batches for three jobs: the two streams' clips in one, then the request
    assert registry.get_sample_value("riffusion_batch_size_count") == 2
    assert registry.get_sample_value("riffusion_batch_size_sum") == 3
    assert first.future.result().shape == (512, 512, 3)  # a stream's job gives the image row


def test_a_one_shot_request_waits_for_at_most_stream_batches_of_clips(torch_engine) -> None:
    """Busy streams: six clips all due before a one-shot request, one batch each. Earliest
    deadline first alone (``stream_batches`` 0) runs the request last; with the bound it
    runs after ``stream_batches`` batches of clips, and the clips go on after it."""
    from riffusion_engine.engine.serve.batcher import Batcher

    for bound, expected in (
        (0, ["clip"] * 6 + ["one-shot"]),
        (3, ["clip"] * 3 + ["one-shot"] + ["clip"] * 3),
    ):
        config = ServerConfig(max_batch=1, batch_window_ms=0, timeout_s=300, stream_batches=bound)
        batcher = Batcher(torch_engine, config)
        order: list[str] = []
        job = batcher.submit(Request(PromptInput("a", 1), steps=1, width=256))
        job.future.add_done_callback(lambda f, order=order: order.append("one-shot"))
        now = time.monotonic()
        clips = [Request(PromptInput("b", i), steps=1, width=256) for i in range(6)]
        for clip in batcher.submit_images(clips, [now + 1 + i for i in range(6)]):
            clip.future.add_done_callback(lambda f, order=order: order.append("clip"))
        batcher.start()
        assert job.future.result(120).audio.shape[-1] > 0
        batcher.close()
        assert order == expected, (bound, order)


def test_serve_scheduler_samples_every_request_and_stream_with_it(tiny_export) -> None:
    """serve --scheduler tcd (a TCD LoRA's sampler): the web app's requests and /stream's
    clips run it; a client does not choose it."""
    from riffusion_engine.engine.cli import build_parser
    from riffusion_engine.engine.cli.common import apply_profile, load_engine
    from riffusion_engine.engine.runtime.seeds import SeedLibrary
    from riffusion_engine.engine.serve.api import engine_request, parse_input

    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "random:tiny",
            "--backend",
            "torch",
            "--profile",
            "realtime",
            "--scheduler",
            "tcd",
        ]
    )
    apply_profile(args)
    engine = load_engine(args)
    config = ServerConfig()
    body = {"alpha": 0.5, "start": {"prompt": "jazz", "seed": 1}, "end": {"prompt": "rock", "seed": 2}}
    request = engine_request(parse_input(json.dumps(body).encode()), engine, SeedLibrary(), config)
    assert request.scheduler == "tcd"
    with background(create_app(engine, config)) as url, connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "start": {"prompt": "jazz", "seed": 1}, "width": 256}))
        ready, _ = receive(ws)
        assert ready["type"] == "ready" and ready["scheduler"] == "tcd"
        clip, _ = receive(ws)
        assert clip["type"] == "clip"
    from riffusion_engine.engine.serve.cluster.config import EngineSpec

    # serve --ray: every replica loads its export with the scheduler the command resolved
    spec = EngineSpec(str(tiny_export[0]), "onnxruntime", "cpu", "random:tiny", scheduler="tcd")
    assert spec.load(threads=1).scheduler == "tcd"
