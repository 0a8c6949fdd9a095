"""Opus against 16-bit PCM on ``/stream``: what each listener costs and hears.

    python benchmarks/bench_opus.py --model random:tiny --json benchmarks/results/opus-random-tiny-cpu.json

Two parts, in one process:

1. The encoder, per format (PCM, then Opus at each ``--kbps``), on one stream's chunks
   (``--duration`` seconds of the walk at ``--width``, made once): kbit/s per listener
   (packets and their 2-byte length fields), the encoder's CPU seconds per second of
   audio (resampling included; the thread's CPU time), the latency it adds to a chunk
   (from the chunk leaving the chain to its frame ready for the socket: the median and
   the largest), the audio each chunk holds back for the next chunk's packets, and the
   decoded audio (PyAV's libopus) against the PCM: the mel spectral convergence, the
   largest step between neighbouring samples at a join and the PCM's own 99.9th
   percentile step (both at 48 kHz).
2. For each ``--listeners`` count N, N real-time listeners at once on one server
   (``serve``'s app in this process, ``--stream-buffer`` clips ahead), first all PCM,
   then all Opus at the server's default bitrate: underruns (a chunk that came after the one before had ended
   playing), the margin and the bytes each received. The listeners time Opus by the
   samples each frame yields without decoding it (their CPU is not the server's).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from typing import Any

import numpy as np
from report import Column, Table, environment, write_json

ENCODER = Table(
    [
        Column("format", 12, left=True),
        Column("kbit/s", 7, ".1f"),
        Column("x PCM", 6, ".3f"),
        Column("CPU %/listener", 14, ".2f"),
        Column("first packet ms p50/max", 23, left=True),
        Column("held ms", 7, ".1f"),
        Column("mel SC", 7, ".4f"),
        Column("join step/PCM p99.9", 19, left=True),
    ],
    sep="  ",
)
LISTENERS = Table(
    [
        Column("format", 10, left=True),
        Column("listeners", 9),
        Column("clips", 6),
        Column("underruns", 9),
        Column("margin min", 10, ".2f", "x"),
        Column("kbit/s each", 11, ".1f"),
    ],
    sep="  ",
)


def chunks_of(engine: Any, *, width: int, steps: int, duration: float) -> list[Any]:
    from riffusion_engine.engine.runtime.requests import PromptInput
    from riffusion_engine.engine.runtime.seeds import seed_image
    from riffusion_engine.engine.stream import Stream, StreamSettings, clips_for

    settings = StreamSettings(steps=steps, width=width, scheduler=engine.scheduler)
    beat = seed_image("og_beat", engine.params, width=width)
    start = PromptInput("church bells on sunday", 1, guidance=engine.guidance)
    clips = clips_for(settings, engine.params, duration)
    with Stream(engine, start, settings=settings, seed_image=beat, max_clips=clips) as stream:
        return list(stream)


def encoder_row(engine: Any, chunks: list[Any], bitrate: int) -> dict[str, Any]:
    """One stream's chunks through one Opus encoder, decoded back as a client does."""
    from riffusion_engine.engine.stream.opus import OpusDecoding, OpusStream
    from riffusion_engine.engine.tools.listener import against_pcm

    rate, channels = engine.params.sample_rate, engine.params.channels
    opus, client = OpusStream(rate, channels, bitrate), OpusDecoding(channels)
    cpu, wall, held, out, size = 0.0, [], [], [], 0
    owed = 0
    for chunk in chunks:
        c0, w0 = time.thread_time(), time.perf_counter()
        encoded = opus.encode(chunk.index, chunk.audio, final=chunk.final)
        cpu += time.thread_time() - c0
        wall.append(1000 * (time.perf_counter() - w0))
        size += sum(2 + len(p) for p in encoded.packets)
        owed += encoded.samples - encoded.decoded
        held.append(1000 * owed / 48000)
        out.append(client.frame(encoded.packets, encoded.decoded, encoded.pre_skip))
    pcm = np.concatenate([c.audio for c in chunks], axis=-1)
    seconds = pcm.shape[-1] / rate
    joins = list(np.cumsum([c.audio.shape[-1] for c in chunks[:-1]]))
    found = against_pcm(np.concatenate(out, axis=-1), pcm, engine.params, joins)
    return {
        "format": "opus",
        "bitrate": bitrate,
        "kbit_s": 8 * size / seconds / 1000,
        "cpu_s_per_audio_s": cpu / seconds,
        "first_packet_ms": {"median": statistics.median(wall), "max": max(wall)},
        "held_ms_max": max(held),
        **found,
    }


def run_listeners(engine: Any, *, count: int, audio_format: str, args: argparse.Namespace) -> dict[str, Any]:
    from riffusion_engine.engine.serve.app import background, create_app
    from riffusion_engine.engine.serve.config import ServerConfig
    from riffusion_engine.engine.tools.listener import Listener
    from websockets.sync.client import connect

    config = ServerConfig(
        max_streams=count, max_unstarted_streams=count, stream_buffer=args.stream_buffer, max_steps=1000
    )
    app = create_app(engine, config)
    results: list[dict[str, Any]] = [{} for _ in range(count)]
    failures: list[BaseException] = []

    def one(i: int, url: str) -> None:
        try:
            with connect(url.replace("http://", "ws://") + "/stream", max_size=None) as ws:
                listener = Listener(ws, decode=False)
                start = {"prompt": "church bells on sunday", "seed": 1 + i, "guidance": engine.guidance}
                listener.send(
                    {
                        "type": "start",
                        "start": start,
                        "num_inference_steps": args.steps,
                        "width": args.width,
                        "format": audio_format,
                    }
                )
                ready = listener.next_event(600)
                if ready["type"] != "ready":
                    raise RuntimeError(f"the server refused the stream: {ready}")
                began = time.monotonic()
                while listener.audio_s < args.listen:
                    listener.pump(0.05)
                wall = time.monotonic() - began
                listener.send({"type": "stop"})
            report = listener.report()
            results[i] = {**report, "margin": listener.audio_s / wall}
        except BaseException as exc:  # reported below, after the others end
            failures.append(exc)

    with background(app) as url:
        threads = [threading.Thread(target=one, args=(i, url)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if failures:
        raise SystemExit(f"bench_opus: a listener failed: {failures[0]!r}")
    return {
        "format": audio_format,
        "listeners": count,
        "clips": sum(r["frames"] for r in results),
        "underruns": sum(r["underruns"] for r in results),
        "margin_min": min(r["margin"] for r in results),
        "kbit_s_each": statistics.mean(8 * r["bytes_per_s"] / 1000 for r in results),
        "per_listener": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:tiny", help="model source (default: random:tiny)")
    parser.add_argument(
        "--profile", default="realtime", choices=("default", "realtime"), help="(default: realtime)"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per clip (default: the profile's)")
    parser.add_argument("--width", type=int, default=256, help="pixels per clip (default: 256)")
    parser.add_argument("--duration", type=float, default=30.0, help="audio seconds encoded (default: 30)")
    parser.add_argument(
        "--kbps", default="64,104,128", help="Opus bitrates, comma-separated (default: 64,104,128)"
    )
    parser.add_argument(
        "--listeners", default="32", help="listeners at once, comma-separated counts; 0: none (default: 32)"
    )
    parser.add_argument(
        "--listen", type=float, default=30.0, help="audio seconds each listener hears (default: 30)"
    )
    parser.add_argument(
        "--stream-buffer", type=int, default=3, help="the server's --stream-buffer (default: 3)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    try:
        bitrates = [int(float(k) * 1000) for k in args.kbps.split(",")]
        counts = [int(n) for n in args.listeners.split(",") if int(n) > 0]
    except ValueError:
        raise SystemExit("bench_opus: --kbps and --listeners take numbers, comma-separated") from None

    from riffusion_engine import load
    from riffusion_engine.engine.runtime.cpu import cpu_features
    from riffusion_engine.kernels.errors import RiffusionError

    try:
        engine = load(
            args.model, backend="torch" if args.profile == "default" else "auto", profile=args.profile
        )
    except RiffusionError as exc:
        raise SystemExit(f"bench_opus: {exc}") from None
    args.steps = args.steps or engine.steps
    chunks = chunks_of(engine, width=args.width, steps=args.steps, duration=args.duration)
    pcm_kbit = engine.params.sample_rate * 16 * engine.params.channels / 1000
    rows = [
        {"format": "pcm_s16le", "kbit_s": pcm_kbit, "cpu_s_per_audio_s": 0.0, "spectral_convergence": 0.0}
    ]
    print(ENCODER.header())
    print(ENCODER.row("pcm_s16le", pcm_kbit, 1.0, 0.0, "0 / 0", 0.0, 0.0, "-"))
    from riffusion_engine.engine.stream.opus import OpusStream

    warm = OpusStream(engine.params.sample_rate, engine.params.channels, bitrates[0])
    warm.encode(0, chunks[0].audio, final=True)  # warm-up: the codec's first use
    for bitrate in bitrates:
        row = encoder_row(engine, chunks, bitrate)
        rows.append(row)
        first = row["first_packet_ms"]
        print(
            ENCODER.row(
                f"opus {bitrate // 1000}k",
                row["kbit_s"],
                row["kbit_s"] / pcm_kbit,
                100 * row["cpu_s_per_audio_s"],
                f"{first['median']:.1f} / {first['max']:.1f}",
                row["held_ms_max"],
                row["spectral_convergence"],
                f"{row['join_jump_max']:.0f} / {row['pcm_step_p999']:.0f}",
            )
        )
    listening = []
    if counts:
        print()
        print(LISTENERS.header())
    for count, audio_format in itertools.product(counts, ("pcm_s16le", "opus")):
        row = run_listeners(engine, count=count, audio_format=audio_format, args=args)
        listening.append(row)
        figures = (row["clips"], row["underruns"], row["margin_min"], row["kbit_s_each"])
        print(LISTENERS.row(audio_format, count, *figures))
    if args.json:
        write_json(
            args.json,
            {
                "model": args.model,
                "profile": engine.choices.describe() if engine.choices is not None else "default",
                "cpu_features": list(cpu_features()),
                "environment": environment(),
                "width": args.width,
                "steps": args.steps,
                "duration_s": args.duration,
                "encoder": rows,
                "listeners": listening,
            },
        )


if __name__ == "__main__":
    main()
