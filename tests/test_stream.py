"""Streams: the web app's walk, clips equal to one-shot runs, gapless joins, continuation,
control from another thread, bounds. Oracles: Engine.run of the same requests, a naive
crossfade written here, the walk's rules as the web app states them."""

from __future__ import annotations

import importlib.util
import itertools
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from riffusion_engine import Stream  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput  # noqa: E402
from riffusion_engine.engine.stream import StreamSettings, Walk  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402

# A quarter of the work of a 512-wide clip; pipelined (two threads: on a CPU the default
# is one), the path a GPU takes.
FAST = dict(steps=3, width=256, pipeline=True)


def naive_join(clips: list[np.ndarray], overlap: int) -> np.ndarray:
    """The documented join, sample by sample: each tail faded out by cos, the next head
    faded in by sin, over ``overlap`` samples (gains at the sample midpoints)."""
    out = clips[0].astype(np.float64)
    for clip in clips[1:]:
        clip = clip.astype(np.float64)
        mixed = out[:, -overlap:].copy()
        for i in range(overlap):
            t = (i + 0.5) / overlap
            mixed[:, i] = out[:, -overlap + i] * np.cos(t * np.pi / 2) + clip[:, i] * np.sin(t * np.pi / 2)
        out = np.concatenate(
            [out[:, :-overlap], np.clip(np.round(mixed), -32768, 32767), clip[:, overlap:]], 1
        )
    return out


def test_the_walk_follows_the_web_app() -> None:
    a, b, c = PromptInput("a", 10), PromptInput("b", 20), PromptInput("c", 30)
    walk = Walk(a, b, StreamSettings())
    seen = []
    for i in range(10):
        if i == 2:
            walk.queue(c)  # queued while the first pair plays: the end from the next wrap on
        r = walk.next()
        seen.append((r.start.prompt, r.end.prompt, r.alpha))
    assert seen == [
        ("a", "b", 0.0), ("a", "b", 0.25), ("a", "b", 0.5), ("a", "b", 0.75), ("a", "b", 1.0),
        ("b", "c", 0.25), ("b", "c", 0.5), ("b", "c", 0.75), ("b", "c", 1.0),
        ("c", "c", 0.25),
    ]  # fmt: skip
    # With nothing queued, the end is the start's prompt with the next seed: a steady prompt moves.
    assert walk.end == PromptInput("c", 31) and walk.start == c
    lone = Walk(a, None, StreamSettings(alpha_step=0.5))
    assert [(r.end.seed, r.alpha) for r in (lone.next(), lone.next(), lone.next())] == [
        (11, 0),
        (11, 0.5),
        (11, 1),
    ]
    assert lone.next().start.seed == 11


def test_stream_clips_equal_one_shot_runs_and_join_as_documented(torch_engine) -> None:
    with Stream.open(torch_engine, "jazz", "techno", seed_image=None, max_clips=4, **FAST) as stream:
        chunks = list(stream)
    assert [c.index for c in chunks] == [0, 1, 2, 3, 3] and chunks[-1].final
    clips = [c.clip for c in chunks[:-1]]
    for chunk in chunks[:-1]:
        (alone,) = torch_engine.run([chunk.request])
        assert np.array_equal(chunk.clip.audio, alone.audio)  # bitwise: one clip at a time
    assert [c.request.alpha for c in chunks[:-1]] == [0.0, 0.25, 0.5, 0.75]
    joined = np.concatenate([c.audio for c in chunks], 1)
    overlap = round(0.2 * torch_engine.params.sample_rate)
    assert stream.overlap_samples == overlap
    assert joined.shape[-1] == stream.length_samples(4) == 4 * clips[0].audio.shape[-1] - 3 * overlap
    assert np.array_equal(joined, naive_join([c.audio for c in clips], overlap))
    # Where each chunk starts is where the previous ended.
    assert [round(c.start_s * c.sample_rate) for c in chunks] == list(
        np.cumsum([0] + [c.audio.shape[-1] for c in chunks[:-1]])
    )
    # No join jumps further than the clips themselves do (their 99.9th percentile).
    own = np.percentile(
        np.concatenate([np.abs(np.diff(c.audio.astype(float), axis=1)).ravel() for c in clips]), 99.9
    )
    ends = np.cumsum([c.audio.shape[-1] for c in chunks[:-1]])
    jumps = [abs(float(joined[0, i]) - float(joined[0, i - 1])) for i in ends]
    assert max(jumps) <= own


def own_jumps(chunks: list) -> tuple[float, list[float]]:
    """The clips' own 99.9th percentile of sample-to-sample steps, and the steps at each
    chunk boundary of the joined audio."""
    clips = [c.clip.audio for c in chunks if c.clip is not None]
    own = np.percentile(
        np.concatenate([np.abs(np.diff(c.astype(float), axis=1)).ravel() for c in clips]), 99.9
    )
    joined = np.concatenate([c.audio for c in chunks], 1).astype(float)
    ends = np.cumsum([c.audio.shape[-1] for c in chunks[:-1]])
    return float(own), [abs(joined[0, i] - joined[0, i - 1]) for i in ends]


@pytest.mark.long
def test_now_walks_from_where_the_music_is_to_the_new_prompt(torch_engine) -> None:
    """A prompt queued now: the clips made but not yet read are dropped and made again;
    the first new clip starts at the last read clip's point (a blend at its alpha) and is
    already alpha_step toward the prompt. Oracles: the clip at alpha 0 of the new pair is
    the last read clip itself (no jump back); each clip is Engine.run of its request; the
    joins and the length law hold across the change."""
    from riffusion_engine.engine.runtime.requests import Blend, Request

    lofi = PromptInput("lofi", 5)
    with Stream.open(
        torch_engine, "jazz", "techno", seed_image=None, max_clips=5, buffer=3, **FAST
    ) as stream:
        chunks = iter(stream)
        seen = [next(chunks), next(chunks)]
        deadline = time.monotonic() + 120
        while stream.clips_made < 4 and time.monotonic() < deadline:  # clips 2 and 3 made, unread
            time.sleep(0.05)
        assert stream.clips_made == 4
        stream.queue(lofi, now=True)
        seen += list(chunks)
    assert [c.index for c in seen] == [0, 1, 2, 3, 4, 4] and seen[-1].final
    before, after = seen[1].request, seen[2].request
    assert after.end is lofi and after.alpha == 0.25
    assert after.start == Blend(before.start, before.end, before.alpha)
    assert [c.request.alpha for c in seen[2:5]] == [0.25, 0.5, 0.75]
    # Its start embedding is the last read clip's interpolated one (the engine's lerp at alpha).
    here = torch_engine._embeddings_at_alpha([Request(after.start, steps=3, width=256)], negative=False)
    assert torch.equal(here, torch_engine._embeddings_at_alpha([before], negative=False))
    # The new pair at alpha 0 is where the music was: the last read clip, bitwise.
    (back,) = torch_engine.run([Request(after.start, lofi, 0.0, steps=3, width=256)])
    assert np.array_equal(back.audio, seen[1].clip.audio)
    for chunk in seen[:-1]:
        (alone,) = torch_engine.run([chunk.request])
        assert np.array_equal(chunk.clip.audio, alone.audio)
    joined = np.concatenate([c.audio for c in seen], 1)
    assert joined.shape[-1] == stream.length_samples(5)
    assert np.array_equal(joined, naive_join([c.clip.audio for c in seen[:-1]], stream.overlap_samples))
    own, jumps = own_jumps(seen)
    assert max(jumps) <= own


def test_jump_makes_the_prompts_own_clip_next_and_steering_again_nests(torch_engine) -> None:
    from riffusion_engine.engine.runtime.requests import Blend, Request

    lofi, ambient, drums = PromptInput("lofi", 5), PromptInput("ambient", 6), PromptInput("drums", 7)
    with Stream.open(
        torch_engine, "jazz", "techno", seed_image=None, max_clips=6, buffer=1, **FAST
    ) as stream:
        chunks = iter(stream)
        seen = [next(chunks), next(chunks)]
        stream.queue(lofi, "jump")
        seen += [next(chunks), next(chunks)]
        stream.queue(ambient, now=True)
        seen.append(next(chunks))
        stream.queue(drums, now=True)  # before the walk reached ambient: from a blend of a blend
        seen += list(chunks)
    walk = [(c.request.end.prompt, c.request.alpha) for c in seen[:-1]]
    assert walk == [
        ("techno", 0),
        ("techno", 0.25),
        ("lofi", 1.0),
        ("lofi", 0.25),
        ("ambient", 0.25),
        ("drums", 0.25),
    ]
    # After a jump the walk wraps: lofi is the start, its next seed the end.
    assert seen[3].request.start is lofi and seen[3].request.end == PromptInput("lofi", 6)
    assert seen[4].request.start == Blend(lofi, PromptInput("lofi", 6), 0.25)
    nested = seen[5].request.start
    assert nested == Blend(seen[4].request.start, ambient, 0.25) and nested.depth == 2
    (back,) = torch_engine.run([Request(nested, drums, 0.0, steps=3, width=256)])
    assert np.array_equal(back.audio, seen[4].clip.audio)  # where the music was, again
    with pytest.raises(RiffusionError, match="when must be one of wrap, now, jump"):
        stream.queue(lofi, "later")


def test_now_with_continuation_keeps_the_last_read_clips_columns(torch_engine) -> None:
    """Clip 2 is made, unread, when a prompt comes now: the new clip 2 keeps clip 1's last
    columns (not the dropped clip 2's), pixel for pixel."""
    k = 32
    with Stream.open(
        torch_engine, "jazz", seed_image=None, continuation=True, continuation_columns=k, buffer=2, **FAST
    ) as stream:
        chunks = iter(stream)
        seen = [next(chunks), next(chunks)]
        deadline = time.monotonic() + 120
        while stream.clips_made < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        stream.queue(PromptInput("lofi", 5), now=True)
        seen += [next(chunks), next(chunks)]
        stream.stop()
        seen += list(chunks)
    clips = [c for c in seen if not c.final]
    assert [c.index for c in clips] == list(range(len(clips))) and seen[-1].final
    assert seen[2].request.end.prompt == "lofi" and seen[2].request.alpha == 0.25
    before, after = (np.asarray(c.clip.image) for c in seen[1:3])
    assert np.array_equal(after[:, :k], before[:, -k:])
    assert np.concatenate([c.audio for c in seen], 1).shape[-1] == stream.length_samples(len(clips))
    with pytest.raises(RiffusionError, match="nothing to steer"):
        stream.queue(PromptInput("ambient", 6), now=True)


def test_blends_nested_deeper_than_the_bound_keep_their_nearest_end() -> None:
    from riffusion_engine.engine.runtime.requests import Blend
    from riffusion_engine.engine.stream.walk import MAX_BLEND_DEPTH, shallow

    point = PromptInput("p0", 0)
    for i in range(1, 12):
        point = Blend(point, PromptInput(f"p{i}", i), 0.25)
    assert point.depth == 11
    capped = shallow(point, MAX_BLEND_DEPTH - 1)
    assert capped.depth == MAX_BLEND_DEPTH - 1 and capped.leaves()[-7:] == point.leaves()[-7:]
    # The innermost blend of the kept ones starts from the prompt the cut ones lean to (p0).
    assert capped.leaves()[0] == PromptInput("p0", 0)
    walk = Walk(PromptInput("a", 1), None, StreamSettings())
    walk.steer(point, PromptInput("b", 2))
    assert walk.peek().blend.depth == MAX_BLEND_DEPTH


@pytest.mark.long
def test_without_pipelining_and_with_lookahead(torch_engine) -> None:
    settings = dict(seed_image=None, max_clips=3, steps=3, width=256)
    with Stream.open(torch_engine, "jazz", pipeline=False, **settings) as stream:
        sequential = list(stream)
        assert len(stream._threads) == 1
    with Stream.open(torch_engine, "jazz", lookahead=3, pipeline=True, **settings) as stream:
        batched = list(stream)
    with Stream.open(torch_engine, "jazz", **settings) as stream:
        assert not stream.pipelined  # the default on a CPU
    assert len(sequential) == len(batched) == 4
    for a, b in zip(sequential[:-1], batched[:-1], strict=True):
        (alone,) = torch_engine.run([a.request])
        assert np.array_equal(a.clip.audio, alone.audio)
        assert a.request == b.request
        # Batched clips: the images within the engine's batching tolerance (8-bit pixels).
        pa, pb = np.asarray(a.clip.image, dtype=int), np.asarray(b.clip.image, dtype=int)
        assert np.abs(pa - pb).max() <= 1


def test_a_seed_image_stream_is_the_web_apps_request(torch_engine) -> None:
    from riffusion_engine.engine.runtime.seeds import seed_image

    with Stream.open(torch_engine, "jazz", max_clips=1, steps=4, pipeline=True) as stream:
        (chunk, _tail) = list(stream)
    assert chunk.request.seed_image.tobytes() == seed_image("og_beat", torch_engine.params).tobytes()
    assert chunk.request.start.denoising == 0.75 and chunk.request.steps == 4
    (alone,) = torch_engine.run([chunk.request])
    assert np.array_equal(chunk.clip.audio, alone.audio)


def test_continuation_keeps_the_previous_tail(torch_engine) -> None:
    from riffusion_engine.kernels.stft import stft

    k = 32
    with Stream.open(
        torch_engine, "jazz", seed_image=None, continuation=True, continuation_columns=k, max_clips=3, **FAST
    ) as stream:
        chunks = list(stream)
    images = [np.asarray(c.clip.image) for c in chunks[:-1]]
    for before, after in itertools.pairwise(images):
        assert np.array_equal(after[:, :k], before[:, -k:])  # the kept columns, pixel for pixel
        assert not np.array_equal(after[:, k:], before[:, : after.shape[1] - k])
    second = chunks[1].request
    assert second.mask is not None and np.asarray(second.mask)[:, :k].max() == 0
    assert np.asarray(second.mask)[:, k:].min() == 255
    # The join spans exactly the kept columns' audio, and the two clips' audio there has
    # the same spectrogram (they are reconstructions of the same columns).
    hop = torch_engine.params.hop_length
    overlap = (k - 1) * hop
    assert stream.overlap_samples == overlap
    tail = chunks[0].clip.audio[0, -overlap:].astype(np.float64)
    head = chunks[1].clip.audio[0, :overlap].astype(np.float64)
    later = chunks[1].clip.audio[0, overlap : 2 * overlap].astype(np.float64)

    def spectrum(x: np.ndarray) -> np.ndarray:
        return np.abs(stft(x / (np.abs(x).max() + 1e-9), n_fft=2048, hop_length=512)).mean(
            -2
        )  # the average spectrum

    same = np.corrcoef(np.log1p(spectrum(tail)), np.log1p(spectrum(head)))[0, 1]
    other = np.corrcoef(np.log1p(spectrum(tail)), np.log1p(spectrum(later)))[0, 1]
    assert same > 0.9 and same > other
    joined = np.concatenate([c.audio for c in chunks], 1)
    assert joined.shape[-1] == stream.length_samples(3)


@pytest.mark.long
def test_prompt_changes_pause_resume_and_stop_from_another_thread(torch_engine) -> None:
    stream = Stream.open(torch_engine, "jazz", "techno", seed_image=None, alpha_step=0.5, buffer=1, **FAST)
    try:
        chunks = iter(stream)
        first = next(chunks)
        stream.queue(PromptInput("lofi", 5))
        stream.pause()
        time.sleep(1.0)
        started = stream.clips_started
        time.sleep(1.5)
        assert stream.clips_started == started  # paused: nothing new begins
        stream.resume()
        seen = [first] + [next(chunks) for _ in range(5)]
        assert [(c.request.start.prompt, c.request.end.prompt, c.request.alpha) for c in seen] == [
            ("jazz", "techno", 0.0), ("jazz", "techno", 0.5), ("jazz", "techno", 1.0),
            ("techno", "lofi", 0.5), ("techno", "lofi", 1.0), ("lofi", "lofi", 0.5),
        ]  # fmt: skip
        stream.update(start=PromptInput("ambient", 9), alpha=0.0)
        later = [next(chunks) for _ in range(4)]
        assert any(c.request.start.prompt == "ambient" and c.request.alpha == 0.0 for c in later)
        with pytest.raises(RiffusionError, match="prompt"):
            stream.queue(PromptInput(""))  # refused; the stream goes on
        next(chunks)
        stream.stop()
        rest = list(chunks)
        assert rest and rest[-1].final and len(rest) <= 3  # what was buffered, then the tail
    finally:
        stream.close()
    assert not any(t.is_alive() for t in stream._threads)


@pytest.mark.slow  # CI runs it (.ci/run); seconds of waiting
def test_a_reader_that_stops_reading_stops_the_stream(torch_engine) -> None:
    begin = time.monotonic()
    with Stream.open(torch_engine, "jazz", seed_image=None, buffer=2, **FAST) as stream:
        next(iter(stream))
        # Quiet for three clips' time (the first clip's, on this machine): the stream has
        # stopped making clips, rather than being between two of them.
        quiet = max(2.0, 3 * (time.monotonic() - begin))
        deadline = time.monotonic() + 120
        held = -1
        while stream.clips_started != held and time.monotonic() < deadline:
            held = stream.clips_started
            time.sleep(quiet)
        assert stream.clips_started == held
        # the buffer, one clip waiting for room in it, one between the threads, one denoised
        assert held <= 1 + 2 + 1 + 1 + 1


def test_bad_stream_settings_are_clear_errors(torch_engine) -> None:
    for bad, match in (
        (dict(alpha_step=0), "alpha_step"),
        (dict(lookahead=0), "lookahead"),
        (dict(continuation=True, continuation_columns=12), "continuation_columns"),
        (dict(continuation=True, lookahead=2), "continuation needs lookahead 1"),
        (dict(crossfade_s=-1), "crossfade_s"),
    ):
        with pytest.raises(RiffusionError, match=match):
            Stream.open(torch_engine, "jazz", seed_image=None, **bad)
    with pytest.raises(RiffusionError, match="prompt"):
        Stream.open(torch_engine, "", seed_image=None)
    from riffusion_engine.engine.runtime.seeds import seed_image

    with pytest.raises(RiffusionError, match="seed_image is 512x512; this clip is 256x512"):
        Stream.open(torch_engine, "jazz", width=256, seed_image=seed_image("og_beat"))
    with pytest.raises(RiffusionError, match="unknown stream setting 'lookahed'"):
        Stream.open(torch_engine, "jazz", seed_image=None, lookahed=2)
    with pytest.raises(RiffusionError, match="max_clips"):
        Stream.open(torch_engine, "jazz", seed_image=None, max_clips=0)
    with pytest.raises(RiffusionError, match="unknown seed image"):
        Stream.open(torch_engine, "jazz", seed_image="nope")


def test_cli_stream_writes_the_duration_and_prints_the_margin(tmp_path: Path, capsys) -> None:
    import soundfile as sf

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lofi\nambient\n")
    out = tmp_path / "long.wav"
    argv = (
        "stream",
        "--start",
        "jazz",
        "--end",
        "techno",
        "--prompts",
        str(prompts),
        "--model",
        "random:tiny",
    )
    code, stdout, stderr = run_cli(
        *argv, "--backend", "torch", "--duration", "12", "--steps", "2", "-o", str(out)
    )
    assert code == 0, stderr
    audio, rate = sf.read(out)
    assert rate == 44100 and len(audio) == 12 * 44100
    assert "real-time margin" in stdout and "3 clips" in stdout
    if importlib.util.find_spec("av") is not None:  # the serve extra's PyAV
        _the_opus_file_decodes_to_the_wav(argv, audio, tmp_path)
    code, _, stderr = run_cli(*argv, "--duration", "0", "-o", str(tmp_path / "x.wav"))
    assert code == 2 and "--duration" in stderr and not (tmp_path / "x.wav").exists()
    code, _, stderr = run_cli("stream", "--start", "a", "--prompts", str(tmp_path / "none"), "-o", str(out))
    assert code == 2 and "--prompts" in stderr


def _the_opus_file_decodes_to_the_wav(argv: tuple[str, ...], wav: np.ndarray, tmp_path: Path) -> None:
    """``stream -o x.opus``: Ogg Opus that FFmpeg's own demuxer and decoder (PyAV) read as
    the WAV's audio at 48 kHz, its length exactly and its mel spectrogram within 5 %."""
    import av
    from riffusion_engine.engine.tools.listener import against_pcm
    from riffusion_engine.kernels.params import SpectrogramParams

    out = tmp_path / "long.opus"
    code, _, stderr = run_cli(*argv, "--backend", "torch", "--duration", "12", "--steps", "2", "-o", str(out))
    assert code == 0, stderr
    with av.open(str(out)) as container:
        assert container.format.name == "ogg" and container.streams.audio[0].codec_context.name == "opus"
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=-1)
    assert decoded.shape == (1, 12 * 48000)
    pcm = (wav * 32768)[None]
    found = against_pcm(decoded * 32768, pcm, SpectrogramParams(), [])
    assert found["spectral_convergence"] <= 0.05, found
    code, _, stderr = run_cli(*argv, "--opus-kbps", "8", "-o", str(tmp_path / "x.opus"))
    assert code == 2 and "--opus-kbps" in stderr and not (tmp_path / "x.opus").exists()
