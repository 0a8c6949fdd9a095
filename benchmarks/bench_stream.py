"""Streams: real-time margin, per-clip latency and underruns, with pipelining off and on,
lookahead 1, 2 and 4, and several streams at once through the server's scheduler.

    python benchmarks/bench_stream.py --model random:tiny --duration 60 \\
        --json benchmarks/results/stream-random-tiny-cpu.json
    python benchmarks/bench_stream.py --model random:full --device cuda --precision fp16 --duration 60
    python benchmarks/bench_stream.py --model random:full --profile realtime --rows on1 --duration 60
    python benchmarks/bench_stream.py --model random:full --profile realtime --steer 3 \\
        --widths 256,512 --duration 60


Each stream walks at Riffusion's web-app settings (50 steps, denoising 0.75 on the
og_beat seed image, alpha step 0.25; with --profile realtime, its 4 LCM steps and no
guidance) until it has made ``--duration`` seconds of audio.
The margin is audio seconds made per wall second (1 or more keeps up with playback);
an underrun is a clip ready after it was due, playback having started when the first
clip was ready. Several streams share one engine through the server's batcher (clips
due soonest first, batched when they share a shape), as ``serve`` runs them.
Configurations run one after another in one process, after a warm-up.

With ``--steer N`` it measures what a listener hears instead: a server (``serve``'s app,
in this process) streams to a client that plays in real time on its own clock
(``riffusion_engine.engine.tools.listener``) and sends a new prompt (``--when``, by
default now) each N clips, at a random moment (seeded) of the clip playing. For each
``--widths`` clip width and ``--stream-buffers`` depth it reports ``prompt_to_ear_s`` (from
sending a prompt to hearing the first clip that moves toward it, on the client's clock,
and the server's own figure), the margin (audio seconds received per wall second) and
the underruns after the first clip. ``--format opus`` has the stream sent as Opus, which
the listener decodes (PyAV): the rows add the bits received per second of audio kept
(the clips a steer dropped were received too) and the
latency Opus adds (the server's encoding, the decoding, the audio a chunk holds back for
the next one's packets). ``benchmarks/bench_opus.py`` compares the formats in full.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import threading
import time
from typing import Any

from report import Column, Table, write_json

TABLE = Table(
    [
        Column("streams", 7),
        Column("pipeline", 8),
        Column("lookahead", 9),
        Column("margin", 7, ".2f", "x"),
        Column("clip s", 7, ".2f"),
        Column("first s", 7, ".2f"),
        Column("underruns", 9),
    ],
    sep=" ",
)


def run_streams(engine: Any, *, streams: int, duration: float, settings: dict[str, Any]) -> dict[str, Any]:
    """``streams`` streams at once, each to ``duration`` seconds of audio; their figures."""
    from riffusion_engine.engine.runtime.requests import PromptInput
    from riffusion_engine.engine.runtime.seeds import SeedLibrary, seed_image
    from riffusion_engine.engine.serve.batcher import Batcher
    from riffusion_engine.engine.serve.config import ServerConfig
    from riffusion_engine.engine.serve.streams import StreamHub
    from riffusion_engine.engine.stream import Stream, StreamSettings, advance_samples, clips_for

    config = StreamSettings(**settings)
    clips = clips_for(config, engine.params, duration)
    beat = seed_image("og_beat", engine.params, width=config.width)  # cut to the clip's width
    batcher = hub = None
    if streams > 1:
        server = ServerConfig(max_batch=4, batch_window_ms=20)
        batcher = Batcher(engine, server)
        batcher.start()
        hub = StreamHub(engine, batcher, SeedLibrary(params=engine.params), server, batcher.metrics)
    results: list[dict[str, Any]] = [{} for _ in range(streams)]

    def one(i: int) -> None:
        start = PromptInput("church bells on sunday", 1000 * i, guidance=engine.guidance)
        began = time.perf_counter()
        made: list[float] = []
        seconds = 0.0
        runner = hub.runner if hub is not None else None
        with Stream(
            engine, start, settings=config, seed_image=beat, max_clips=clips, runner=runner
        ) as stream:
            for chunk in stream:
                seconds += chunk.duration_s
                if not chunk.final:
                    made.append(time.perf_counter())
        wall = time.perf_counter() - began
        step = advance_samples(config, engine.params) / engine.params.sample_rate
        # playback starts when clip 0 is ready; clip k is due k clip-steps later
        late = [t - (made[0] + k * step) for k, t in enumerate(made)]
        gaps = [b - a for a, b in itertools.pairwise([began, *made])]
        results[i] = {
            "audio_s": seconds,
            "wall_s": wall,
            "margin": seconds / wall,
            "clip_latency_s": statistics.median(gaps),
            "first_clip_s": made[0] - began,
            "underruns": sum(1 for x in late if x > 0),
        }

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if batcher is not None:
        batcher.close()
    return {
        "streams": streams,
        "settings": settings,
        "clips_per_stream": clips,
        "margin_min": min(r["margin"] for r in results),
        "margin_mean": statistics.mean(r["margin"] for r in results),
        "clip_latency_s": statistics.median(r["clip_latency_s"] for r in results),
        "first_clip_s": max(r["first_clip_s"] for r in results),
        "underruns": sum(r["underruns"] for r in results),
        "per_stream": results,
    }


STEER = Table(
    [
        Column("width", 5),
        Column("buffer", 6),
        Column("clips", 5),
        Column("margin", 7, ".2f", "x"),
        Column("underruns", 9),
        Column("p2e med", 8, ".2f"),
        Column("p2e p90", 8, ".2f"),
        Column("server med", 10, ".2f"),
        Column("kbit/s", 7, ".0f"),
        Column("added ms", 8, ".1f"),
    ],
    sep=" ",
)
PROMPTS = ("church bells on sunday", "dub techno with a choir", "lofi hip hop beat", "jazz trio")


def run_listener(
    engine: Any,
    *,
    width: int,
    steps: int,
    buffer: int,
    duration: float,
    every: int,
    when: str,
    audio_format: str = "pcm_s16le",
) -> dict[str, Any]:
    """One stream through the server to a real-time listener that steers every ``every``
    clips; what it heard."""
    from riffusion_engine.engine.serve.app import background, create_app
    from riffusion_engine.engine.serve.config import ServerConfig
    from riffusion_engine.engine.tools.listener import Listener
    from riffusion_engine.engine.tools.measure import summary
    from websockets.sync.client import connect

    app = create_app(engine, ServerConfig(max_streams=1, stream_buffer=buffer, max_steps=1000))
    start = {"prompt": PROMPTS[0], "seed": 1, "guidance": engine.guidance}
    with background(app) as url, connect(url.replace("http://", "ws://") + "/stream") as ws:
        listener = Listener(ws)
        listener.send(
            {
                "type": "start",
                "start": start,
                "num_inference_steps": steps,
                "width": width,
                "format": audio_format,
            }
        )
        ready = listener.next_event(600)
        if ready["type"] != "ready":
            raise SystemExit(f"bench_stream: the server refused the stream: {ready}")
        began = time.monotonic()
        steered = 0
        offsets = random.Random(0)  # where in the clip the listener sends its prompt
        offset = offsets.random() * ready["clip_s"]
        while listener.audio_s < duration:
            listener.pump(0.02)
            due = (steered + 1) * every  # steer while this clip plays, at a random moment of it
            if due in listener.begins and time.monotonic() >= listener.begins[due] + offset:
                steered += 1
                offset = offsets.random() * ready["clip_s"]
                prompt = PROMPTS[steered % len(PROMPTS)]
                listener.steer({"prompt": prompt, "seed": 1 + steered, "guidance": engine.guidance}, when)
        wall = time.monotonic() - began
        listener.send({"type": "stop"})
    heard = [r for r in listener.reactions if r.client_s is not None]
    client = summary([r.client_s for r in heard]) if heard else None
    server = summary([r.server_s for r in heard]) if heard else None
    clips = sum(1 for e, _ in listener.clips if e["type"] == "clip")
    return {
        "width": width,
        "steps": steps,
        "stream_buffer": buffer,
        "when": when,
        "every_clips": every,
        "clip_s": ready["clip_s"],
        "clips": clips,
        "audio_s": listener.audio_s,
        "wall_s": wall,
        "margin": listener.audio_s / wall,
        "underruns": listener.underruns,
        "prompts": len(listener.reactions),
        "audio": listener.report(),  # format, bytes per second; Opus: the latency it adds
        "prompt_to_ear_s": client,
        "server_prompt_to_ear_s": server,
        "reactions": [
            {"prompt": r.prompt, "index": r.index, "client_s": r.client_s, "server_s": r.server_s}
            for r in listener.reactions
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:tiny", help="model source (default: random:tiny)")
    parser.add_argument("--artifacts", default=None, help="an export directory to run instead of --model")
    parser.add_argument(
        "--backend", default=None, help="engine backend (default: torch; with --profile realtime, its own)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", default=None, help="fp32, fp16, bf16 or int8 (default: the profile's)")
    parser.add_argument(
        "--deep-cache",
        default=None,
        metavar="INTERVAL[:BRANCH]",
        help="DeepCache's schedule; 0: off (default: the profile's; realtime: by the CPU's class)",
    )
    parser.add_argument(
        "--profile",
        default="default",
        choices=("default", "realtime"),
        help="realtime: its few-step LoRA, tiny VAE, lcm at 4 steps, guidance off (default: default)",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="audio seconds per stream (default: 60)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per clip (default: the profile's: 50, the web app's; realtime: 4)",
    )
    parser.add_argument("--streams", type=int, default=2, help="streams at once in the last row (default: 2)")
    parser.add_argument(
        "--rows",
        default="off1,on1,on2,on4,streams",
        help="which rows: off1 (no pipelining), on1, on2, on4 (pipelining, lookahead 1/2/4), streams "
        "(--streams at once) (default: all)",
    )
    parser.add_argument(
        "--steer",
        type=int,
        default=None,
        metavar="N",
        help="measure prompt-to-ear instead: a real-time listener through the server, a new prompt "
        "every N clips",
    )
    parser.add_argument(
        "--when", default="now", choices=("now", "jump", "wrap"), help="with --steer (default: now)"
    )
    parser.add_argument(
        "--widths",
        default="512",
        help="clip widths, comma-separated; without --steer the rows run the first (default: 512)",
    )
    parser.add_argument(
        "--format",
        default="pcm_s16le",
        choices=("pcm_s16le", "opus"),
        help="with --steer: the stream's audio (default: pcm_s16le); opus adds bytes/s and latency",
    )
    parser.add_argument(
        "--stream-buffers", default="3", help="with --steer: the server's --stream-buffer values (default: 3)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.steer is not None and args.steer < 1:
        raise SystemExit("bench_stream: --steer takes a number of clips >= 1")
    if args.format != "pcm_s16le" and args.steer is None:
        raise SystemExit("bench_stream: --format is the listener's (--steer N); without it no audio is sent")

    from riffusion_engine import load
    from riffusion_engine.engine.runtime.cpu import cpu_features
    from riffusion_engine.kernels.errors import RiffusionError

    try:
        engine = load(
            None if args.artifacts else args.model,
            artifacts=args.artifacts,
            backend=args.backend or ("torch" if args.profile == "default" else "auto"),
            device=args.device,
            precision=args.precision,
            profile=args.profile,
            progress=True,
            deep_cache=args.deep_cache,
        )
    except RiffusionError as exc:
        raise SystemExit(f"bench_stream: {exc}") from None
    if engine.choices is not None:
        print(engine.choices.describe())
    args.steps = args.steps or engine.steps
    if args.steer is not None:
        steer(engine, args)
        return
    try:
        width = int(args.widths.split(",")[0])
    except ValueError:
        raise SystemExit("bench_stream: --widths takes integers, comma-separated") from None
    base = {"steps": args.steps, "scheduler": engine.scheduler, "alpha_step": 0.25, "width": width}
    table = {
        "off1": (1, {**base, "pipeline": False, "lookahead": 1}),
        "on1": (1, {**base, "pipeline": True, "lookahead": 1}),
        "on2": (1, {**base, "pipeline": True, "lookahead": 2}),
        "on4": (1, {**base, "pipeline": True, "lookahead": 4}),
        "streams": (args.streams, {**base, "pipeline": True, "lookahead": 1}),
    }
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise SystemExit(f"bench_stream: --rows takes {', '.join(table)}; got {args.rows!r}")
    configs = [table[n] for n in names]
    run_streams(engine, streams=1, duration=5, settings={**base, "steps": min(args.steps, 5)})  # warm-up
    rows = []
    print(TABLE.header())
    for streams, settings in configs:
        row = run_streams(engine, streams=streams, duration=args.duration, settings=settings)
        rows.append(row)
        pipeline = "on" if settings["pipeline"] else "off"
        figures = (row["margin_min"], row["clip_latency_s"], row["first_clip_s"], row["underruns"])
        print(TABLE.row(streams, pipeline, settings["lookahead"], *figures))
    speedup = None
    if "off1" in names and "on1" in names:
        sequential, pipelined = (
            rows[names.index("off1")]["margin_min"],
            rows[names.index("on1")]["margin_min"],
        )
        speedup = pipelined / sequential
        print(f"pipelining: {speedup:.2f}x the sequential margin")
    if args.json:
        out = {
            "model": args.artifacts or args.model,
            "backend": args.backend,
            "device": args.device,
            "precision": args.precision,
            "profile": engine.choices.describe() if engine.choices is not None else "default",
            "cpu_features": list(cpu_features()),
            "duration_s": args.duration,
            "rows": dict(zip(names, rows, strict=True)),
            "pipelining_speedup": speedup,
        }
        write_json(args.json, out)


def steer(engine: Any, args: argparse.Namespace) -> None:
    from riffusion_engine.engine.runtime.cpu import cpu_features

    try:
        widths = [int(w) for w in args.widths.split(",")]
        buffers = [int(b) for b in args.stream_buffers.split(",")]
    except ValueError:
        raise SystemExit(
            "bench_stream: --widths and --stream-buffers take integers, comma-separated"
        ) from None
    run_listener(
        engine,
        width=widths[0],
        steps=args.steps,
        buffer=1,
        duration=1,
        every=1,
        when=args.when,
        audio_format=args.format,
    )  # warm-up
    rows = []
    print(STEER.header())
    for width, buffer in itertools.product(widths, buffers):
        row = run_listener(
            engine,
            width=width,
            steps=args.steps,
            buffer=buffer,
            duration=args.duration,
            every=args.steer,
            when=args.when,
            audio_format=args.format,
        )
        rows.append(row)
        client, server = row["prompt_to_ear_s"] or {}, row["server_prompt_to_ear_s"] or {}
        nan = float("nan")
        print(
            STEER.row(
                width,
                buffer,
                row["clips"],
                row["margin"],
                row["underruns"],
                client.get("median_s", nan),
                client.get("p90_s", nan),
                server.get("median_s", nan),
                row["audio"]["bytes_per_s"] * 8 / 1000,
                row["audio"].get("added_latency_ms", 0.0),
            )
        )
    if args.json:
        out = {
            "model": args.artifacts or args.model,
            "backend": engine.backend.name,
            "device": args.device,
            "profile": engine.choices.describe() if engine.choices is not None else "default",
            "cpu_features": list(cpu_features()),
            "duration_s": args.duration,
            "steer_every_clips": args.steer,
            "format": args.format,
            "rows": rows,
        }
        write_json(args.json, out)


if __name__ == "__main__":
    main()
