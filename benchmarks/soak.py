"""Soak the server: ``riffusion-engine serve`` under a fixed mix of work for N minutes,
watching its memory and its answers.

The mix, in rounds until the time is up:

- one-shot ``/run_inference/`` requests in bursts of ``--max-batch``, ..., 2, 1 alike
  requests sent together (so the batcher forms every batch size), interpolating at alpha
  0, 0.25 or 0.5, at 2 steps, on each built-in seed image;
- then ``--streams`` ``/stream`` sockets at once, with a request among them, with every
  option in turn: widths, steps, crossfades, continuation on and off, a seed-image
  update, prompts steered now, as a jump and at the wrap, pause and resume; each is
  stopped after a few clips (``stop``), or dropped (the socket closed without a word),
  in turn.

``--mix streams`` runs the web app and streams together instead: ``--streams`` streams
play for the whole run (each told a clip began as it arrives, so the server keeps making
clips), and one one-shot request at a time is sent beside them, every
``--request-every`` seconds. Stream clips are due within seconds, so without a bound
(``--stream-batches 0``: earliest deadline first alone) the requests wait behind them;
the server's ``--stream-batches`` (passed through) bounds that wait.

It reports the server's RSS (its process and children) every second: its peak against
the most it held while starting (loading and warming up), and the peak after the first
two minutes against the peak within them; the one-shot latency (p50, p99, and the first
request's), the start-up time (launch to ``/health`` answering), and every answer that
is not a 200 and every close that is not 1000, as JSON and as a PNG (RSS and latency over
time). Run from the repository root::

    python benchmarks/soak.py --model random:tiny --backend onnxruntime --minutes 5
    python benchmarks/soak.py --model random:full --max-batch 4 --minutes 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import environment, write_json

SEED_IMAGES = ("og_beat", "agile", "marim", "motorway", "vibes")


class Soak:
    """What the clients saw, shared by their threads."""

    def __init__(self, url: str, began: float) -> None:
        self.url, self.began = url, began
        self.lock = threading.Lock()
        self.latencies: list[tuple[float, float, int]] = []  # (time, seconds, batch)
        self.failures: list[dict[str, Any]] = []  # non-200 answers, abnormal closes, client errors
        self.streams = {"opened": 0, "clips": 0, "stopped": 0, "dropped": 0}
        self.stop = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self.began

    def fail(self, **what: Any) -> None:
        with self.lock:
            self.failures.append({"t_s": round(self.now(), 2), **what})


def body(rng: random.Random, steps: int, seed_image: str) -> dict[str, Any]:
    """A web-app request (interpolating or at its start); alike in steps and seed image,
    so a burst of them batches."""
    prompt = {"prompt": rng.choice(["church bells", "jazz piano", "techno"]), "seed": rng.randrange(10**6)}
    return {
        "alpha": rng.choice([0.0, 0.25, 0.5]),
        "num_inference_steps": steps,
        "seed_image_id": seed_image,
        "start": {**prompt, "denoising": 0.75, "guidance": 7.0},
        "end": {"prompt": "ambient pads", "seed": rng.randrange(10**6), "denoising": 0.75, "guidance": 7.0},
    }


def burst(soak: Soak, client: Any, rng: random.Random, size: int) -> None:
    """``size`` alike requests sent together (the batcher makes them one batch)."""
    import httpx

    steps, image = 2, rng.choice(SEED_IMAGES)  # one UNet step from the seed image (PNDM: two calls)

    def post(b: dict[str, Any]) -> None:
        begin = time.monotonic()
        try:
            answer = client.post(soak.url + "/run_inference/", json=b)
        except httpx.HTTPError as exc:
            soak.fail(kind="one-shot", error=f"{type(exc).__name__}: {exc}")
            return
        with soak.lock:
            soak.latencies.append((round(soak.now(), 2), time.monotonic() - begin, size))
        if answer.status_code != 200:
            soak.fail(kind="one-shot", status=answer.status_code, detail=answer.text[:200])

    threads = [threading.Thread(target=post, args=(body(rng, steps, image),)) for _ in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# Every option a stream takes, in turn (a seed image at the default 0.75 runs
# int(steps * 0.75) steps: 2 and 3 steps make one and two UNet steps).
STREAM_OPTIONS = (
    {"width": 256, "crossfade_s": 0.2, "num_inference_steps": 2},
    {"width": 512, "continuation": True, "num_inference_steps": 3},
    {"width": 256, "crossfade_s": 0.0, "alpha_step": 0.5, "num_inference_steps": 2},
    {"width": 512, "crossfade_s": 1.0, "seed_image_id": "vibes", "num_inference_steps": 2},
)


def listen(soak: Soak, start: dict[str, Any], *, clips: float, drop: bool = False, after: Any = None) -> None:
    """One ``/stream`` listener: ``start`` sent, each clip told to have begun as it arrives
    (then ``after(ws, clips_so_far)``), until ``clips`` clips or the run's end; then
    stopped, or dropped (the socket closed without a word, as a closed laptop is)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = soak.url.replace("http", "ws", 1) + "/stream"
    try:
        with connect(url, max_size=2**26, open_timeout=60) as ws:
            ws.send(json.dumps(start))
            with soak.lock:
                soak.streams["opened"] += 1
            got = 0
            while got < clips and not soak.stop.is_set():
                message = ws.recv(timeout=900)
                if isinstance(message, bytes):
                    continue
                event = json.loads(message)
                if event.get("type") == "error":
                    soak.fail(kind="stream", error=event)
                if event.get("type") != "clip":
                    continue
                got += 1
                with soak.lock:
                    soak.streams["clips"] += 1
                ws.send(json.dumps({"type": "played", "clip": event["index"]}))
                if after is not None:
                    after(ws, got)
            if drop:
                ws.socket.close()
                with soak.lock:
                    soak.streams["dropped"] += 1
                return
            ws.send(json.dumps({"type": "stop"}))
            with contextlib.suppress(TimeoutError):
                while True:
                    ws.recv(timeout=30)
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        if drop:
            return
        if code != 1000:
            soak.fail(kind="stream", close=code, reason=exc.rcvd.reason if exc.rcvd else "")
        else:
            with soak.lock:
                soak.streams["stopped"] += 1
    except Exception as exc:  # a client-side failure is a finding too
        soak.fail(kind="stream", error=f"{type(exc).__name__}: {exc}")


def stream(soak: Soak, n: int, rng: random.Random, clips: int) -> None:
    """Stream ``n``: the ``n``-th options, steered after its first clip, its seed image
    updated and paused and resumed after its second; stopped after ``clips`` clips
    (even ``n``) or dropped (odd ``n``: the socket closed without a word)."""
    options = STREAM_OPTIONS[n % len(STREAM_OPTIONS)]
    start = {"type": "start", "start": {"prompt": "lofi beat", "seed": rng.randrange(10**6)}}
    start["end"] = {"prompt": "string quartet", "seed": rng.randrange(10**6)}

    def steer(ws: Any, got: int) -> None:
        if got == 1:
            when = ("now", "jump", "wrap")[n % 3]
            prompt = {"prompt": "bossa nova", "seed": rng.randrange(10**6)}
            ws.send(json.dumps({"type": "prompt", "prompt": prompt, "when": when}))
        elif got == 2:
            ws.send(json.dumps({"type": "update", "seed_image_id": rng.choice(SEED_IMAGES)}))
            ws.send(json.dumps({"type": "pause"}))
            ws.send(json.dumps({"type": "resume"}))

    listen(soak, {**start, **options}, clips=clips, drop=n % 2 == 1, after=steer)


def playing_stream(soak: Soak, rng: random.Random) -> None:
    """A stream that plays until the run ends (256-pixel clips of 2 steps); then stopped."""
    prompt = {"prompt": "lofi beat", "seed": rng.randrange(10**6)}
    listen(soak, {"type": "start", "start": prompt, "width": 256, "num_inference_steps": 2}, clips=math.inf)


def streams_and_requests(soak: Soak, args: argparse.Namespace) -> None:
    """``--mix streams``: the streams play throughout; one request at a time beside them."""
    import httpx

    rng = random.Random(args.seed)
    players = [
        threading.Thread(target=playing_stream, args=(soak, random.Random(rng.randrange(2**32))))
        for _ in range(args.streams)
    ]
    for t in players:
        t.start()
    with httpx.Client(timeout=900) as client:
        soak.stop.wait(5.0)  # the streams are running
        while not soak.stop.is_set():
            burst(soak, client, rng, 1)
            soak.stop.wait(args.request_every)
    for t in players:
        t.join(900)


def rounds(soak: Soak, args: argparse.Namespace) -> None:
    """Rounds until the time is up: bursts of every size from ``--max-batch`` down to 1,
    one after another; then ``--streams`` streams at once, with the next options, and a request
    among them (stream clips and requests share the batcher)."""
    import httpx

    rng = random.Random(args.seed)
    n = 0
    with httpx.Client(timeout=900) as client:
        while not soak.stop.is_set():
            for size in range(args.max_batch, 0, -1):  # the largest first: the peak
                if soak.stop.is_set():
                    return
                burst(soak, client, rng, size)
            seeds = [random.Random(rng.randrange(2**32)) for _ in range(args.streams)]
            threads = [
                threading.Thread(target=stream, args=(soak, n + i, seeds[i], args.stream_clips))
                for i in range(args.streams)
            ]
            threads.append(threading.Thread(target=burst, args=(soak, client, rng, 1)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            n += args.streams


def rss_bytes(process: Any) -> int:
    import psutil

    total = 0
    with contextlib.suppress(psutil.Error):
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "riffusion_engine.engine.cli", "serve", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--backend", args.backend, "--max-batch", str(args.max_batch)]
    # Dropped sockets hold their slot until the server notices: room for one each.
    command += ["--max-streams", str(2 * args.streams + 1), "--timeout", "900"]
    command += ["--stream-batches", str(args.stream_batches)]
    command += ["--artifacts", args.artifacts] if args.artifacts else ["--model", args.model]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(process: subprocess.Popen[str], url: str, timeout: float) -> int:
    """Wait for ``/health``; the most RSS the server held meanwhile (loading, warming up)."""
    import httpx
    import psutil

    server = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    most = 0
    while time.monotonic() < deadline:
        most = max(most, rss_bytes(server))
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}):\n{process.stdout.read()}")  # type: ignore[union-attr]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return most
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:g} s")


def plot(path: Path, rss: list[tuple[float, float]], latencies: list[tuple[float, float, int]]) -> None:
    """RSS (GiB) and one-shot latency (s) over time, as two panels of a PNG."""
    from PIL import Image, ImageDraw

    width, height, pad = 1000, 320, 60
    image = Image.new("RGB", (width, 2 * height), "white")
    draw = ImageDraw.Draw(image)
    end = max([t for t, _ in rss] + [t for t, _, _ in latencies] + [1.0])

    def panel(top: int, points: list[tuple[float, float]], title: str, dots: bool) -> None:
        high = max([v for _, v in points] + [1e-9]) * 1.1
        x0, y0, x1, y1 = pad, top + 30, width - 20, top + height - 40
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, top + 8), title, fill="black")
        for k in range(5):
            y = y1 - (y1 - y0) * k / 4
            draw.line((x0 - 4, y, x0, y), fill="black")
            draw.text((4, y - 6), f"{high * k / 4:.2f}", fill="black")
        for k in range(6):
            x = x0 + (x1 - x0) * k / 5
            draw.line((x, y1, x, y1 + 4), fill="black")
            draw.text((x - 12, y1 + 8), f"{end * k / 5 / 60:.1f} min", fill="black")
        xy = [(x0 + (x1 - x0) * t / end, y1 - (y1 - y0) * v / high) for t, v in points]
        if dots:
            for x, y in xy:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="navy")
        elif len(xy) > 1:
            draw.line(xy, fill="darkred", width=2)

    panel(0, [(t, v / 2**30) for t, v in rss], "server RSS (GiB) over time", dots=False)
    panel(height, [(t, s) for t, s, _ in latencies], "one-shot latency (s) over time", dots=True)
    image.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="random:tiny", help="model source (default: random:tiny)")
    source.add_argument("--artifacts", default=None, help="an export directory instead")
    p.add_argument("--backend", default="onnxruntime", help="server backend (default: onnxruntime)")
    p.add_argument("--cache-dir", default=None, help="exports made on first use (default: the user cache)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (default: 4)")
    p.add_argument("--minutes", type=float, default=5.0, help="how long the mix runs (default: 5)")
    p.add_argument("--streams", type=int, default=2, help="stream clients at once (default: 2)")
    p.add_argument("--stream-clips", type=int, default=3, help="clips each stream takes (default: 3)")
    p.add_argument(
        "--mix", choices=("rounds", "streams"), default="rounds", help="the work (default: rounds)"
    )
    p.add_argument(
        "--request-every",
        type=float,
        default=2.0,
        help="--mix streams: seconds between requests (default: 2)",
    )
    p.add_argument("--stream-batches", type=int, default=3, help="the server's --stream-batches (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=3600.0, help="seconds (default: 3600)")
    p.add_argument("--json", default="soak.json", help="where the report goes (default: soak.json)")
    p.add_argument("--png", default=None, help="the plot (default: the JSON's path as .png)")
    args = p.parse_args()
    if args.minutes <= 0 or args.max_batch < 1 or args.streams < 0 or args.stream_clips < 3:
        p.error("--minutes > 0, --max-batch >= 1, --streams >= 0 and --stream-clips >= 3")
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launched = time.monotonic()
    process = start_server(args, port)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    try:
        warming = wait_ready(process, url, args.startup_timeout)
        reader.start()
        startup_s = time.monotonic() - launched
        server = psutil.Process(process.pid)
        warm = rss_bytes(server)
        print(
            f"server ready in {startup_s:.1f} s, RSS {warm / 2**30:.2f} GiB idle, "
            f"{warming / 2**30:.2f} GiB at most while starting; soaking {args.minutes:g} min"
        )
        began = time.monotonic()
        soak = Soak(url, began)
        rss: list[tuple[float, float]] = [(0.0, warm)]
        work = rounds if args.mix == "rounds" else streams_and_requests
        clients = [threading.Thread(target=work, args=(soak, args))]
        for t in clients:
            t.start()
        while time.monotonic() - began < args.minutes * 60:
            time.sleep(1.0)
            rss.append((round(soak.now(), 1), rss_bytes(server)))
            if process.poll() is not None:
                soak.fail(kind="server", error=f"exited with {process.returncode}")
                break
        soak.stop.set()
        for t in clients:
            t.join(900)  # the work in flight finishes
            rss.append((round(soak.now(), 1), rss_bytes(server)))
    finally:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(120)
        if process.poll() is None:
            process.kill()

    values = [v for _, v in rss]
    peak = max(values)
    # Growth: the peak after the first two minutes against the peak within them.
    early = max([v for t, v in rss if t < 120] or values[:1])
    late = max([v for t, v in rss if t >= 120] or values[-1:])
    seconds = [s for _, s, _ in soak.latencies]
    p50, p99 = np.percentile(seconds, [50, 99]).tolist() if seconds else (None, None)
    result = {
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
        "environment": environment(),
        "server": {
            "model": args.artifacts or args.model,
            "backend": args.backend,
            "max_batch": args.max_batch,
            "stream_batches": args.stream_batches,
        },
        "mix": args.mix,
        "minutes": args.minutes,
        "startup_s": startup_s,
        "rss_gib": {
            "idle_after_start": warm / 2**30,
            "peak_while_starting": warming / 2**30,
            "peak": peak / 2**30,
            "peak_over_starting": peak / warming,
            "peak_first_2_min": early / 2**30,
            "peak_after_2_min": late / 2**30,
            "growth_after_2_min": late / early - 1,
            "final": values[-1] / 2**30,
        },
        "one_shot": {
            "answers": len(seconds),
            "first_s": soak.latencies[0][1] if soak.latencies else None,
            "p50_s": p50,
            "p99_s": p99,
            "max_s": max(seconds) if seconds else None,
            "mean_s": statistics.fmean(seconds) if seconds else None,
            "by_batch": {
                str(b): len([1 for _, _, n in soak.latencies if n == b]) for b in range(1, args.max_batch + 1)
            },
        },
        "streams": soak.streams,
        "failures": soak.failures,
        "rss_timeline": [[t, v / 2**30] for t, v in rss],
        "latency_timeline": [[t, s, n] for t, s, n in soak.latencies],
    }
    out = Path(args.json)
    write_json(out, result)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    plot(png, rss, soak.latencies)
    r = result["rss_gib"]
    print(
        f"RSS peak {r['peak']:.2f} GiB ({r['peak_over_starting']:.2f}x the start-up's "
        f"{r['peak_while_starting']:.2f}); idle after start {r['idle_after_start']:.2f} GiB, at the end "
        f"{r['final']:.2f} GiB; peak after the first 2 min {100 * r['growth_after_2_min']:+.1f} % "
        "of the peak within them"
    )
    if seconds:
        print(
            f"one-shot: {len(seconds)} answers, first {seconds[0]:.2f} s, p50 {p50:.2f} s, p99 {p99:.2f} s, "
            f"max {max(seconds):.2f} s"
        )
    print(f"streams: {soak.streams}; failures: {len(soak.failures)}")
    for failure in soak.failures[:20]:
        print("  ", failure)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
