"""What a new user meets on the command line (a subprocess, as they run it): bad input is
one line naming the flag and its range, before any heavy work, with no traceback and no
partial output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

CLI = [sys.executable, "-m", "riffusion_engine.engine.cli"]
TINY = ("--model", "random:tiny", "--backend", "torch")


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_values_are_one_line_before_any_output(tmp_path: Path) -> None:
    png = tmp_path / "in.png"
    from riffusion_engine.engine.runtime.seeds import seed_image

    seed_image("og_beat", width=64).save(png)
    binary = tmp_path / "song.wav"
    soundfile.write(binary, np.zeros((4410, 1), np.int16), 44100)
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty folder: nothing may be written into it
    # A model that loading would fail on: a check that names --width came first.
    stream_no_model = (
        "stream",
        "--start",
        "a",
        "-o",
        str(out / "s.wav"),
        "--model",
        str(tmp_path / "no-model"),
    )
    here = tmp_path / "cwd"
    here.mkdir()  # the working directory: nothing may be written there either (demo's default)
    cases = [
        (("image-to-audio", str(png), "-o", str(out / "x.wav"), "--seed", "-1"), ("seed", "0..2**63-1")),
        (("roundtrip", "-o", str(out), "--seed", "-1"), ("--seed", "0..2**63-1")),
        (("doctor", "--steps", "0"), ("--steps", "1..1000")),
        (("export", "--model", "random:tiny", "-o", str(out), "--height", "256"), ("--height 256", "512")),
        (("export", "--model", "random:tiny", "-o", str(out), "--opset", "25"), ("opset", "17..")),
        (("generate", "", "-o", str(out / "a.wav"), "--cache-dir", str(out / "cache")), ("prompt is empty",)),
        (("demo", "--prompt", "", "-o", str(out)), ("prompt is empty",)),
        (("generate", "a", "-o", str(out / "a.wav"), *TINY, "--width", "8"), ("24 pixels",)),
        (
            ("generate", "a", "-o", str(out / "a.wav"), "--model", "random:tiny", "--width", "128"),
            ("256 pixels", "--backend torch takes clips down to 24 pixels", "--width 128"),
        ),
        (
            ("generate", "a", "-o", str(out / "a.wav"), *TINY, "--width", "4096"),
            ("2048 pixels", "--max-width"),
        ),
        (
            ("stream", "--start", "a", "-o", str(out / "s.wav"), *TINY, "--prompts", str(binary)),
            ("--prompts", "not UTF-8 text"),
        ),
        (("stream", "--start", "a", "-o", str(out / "s.wav"), *TINY, "--alpha-step", "0"), ("--alpha-step",)),
        (("stream", "--start", "a", "-o", str(out / "s.wav"), *TINY, "--crossfade", "9"), ("--crossfade",)),
        (("stream", "--start", "a", "--end", "", "-o", str(out / "s.wav"), *TINY), ("--end is empty",)),
        # Errors name the flag, not a config's field.
        (("generate", "a", "-o", str(out / "a.wav"), *TINY, "--steps", "0"), ("--steps", "1..1000")),
        (("export", "--model", "random:tiny", "-o", str(out), "--max-batch", "0"), ("--max-batch",)),
        (("export", "--model", "random:tiny", "-o", str(out), "--seed", "-1"), ("--seed", "0..2**63-1")),
        (
            ("export", "--model", "random:tiny", "-o", str(out), "--max-width", "256"),
            ("--max-width 256", "--width 512"),
        ),
        (("image-to-audio", str(png), "-o", str(out / "x.wav"), "--iters", "-5"), ("--iters",)),
        # Attention scores no machine holds (1 TiB at 16384 pixels): refused by the estimate.
        (
            ("export", "--model", "random:tiny", "-o", str(out / "wide"), "--width", "16384"),
            ("verifying the unet at 16384 pixels needs 1024.0 GiB", "--width"),
        ),
        (
            ("interpolate", "--start", "a", "--end", "b", "-o", str(out / "seq"), *TINY, "--end-seed", "-1"),
            ("--end-seed", "0..2**63-1"),
        ),
        # Widths Griffin-Lim or the stream's joins cannot take, before the model is looked for.
        ((*stream_no_model, "--width", "16"), ("--width 16", "24 pixels")),
        ((*stream_no_model, "--width", "24", "--crossfade", "0.5"), ("--crossfade 0.5", "--width 24")),
        # A seed image that would run none of the steps: the clip would be the seed image.
        (
            ("generate", "a", "--seed-image", str(png), "-o", str(out / "a.wav"), *TINY, "--steps", "1"),
            ("--steps 1", "--denoising 0.75", "--steps 2 or more"),
        ),
        (
            (
                "interpolate",
                "--start",
                "a",
                "--end",
                "b",
                "-o",
                str(out / "seq"),
                *TINY,
                "--profile",
                "realtime",
                "--steps",
                "1",
            ),
            ("--steps 1", "--denoising"),
        ),
    ]
    for argv, needles in cases:
        one_line(run(*argv, cwd=here), *needles)
        assert not any(out.rglob("*")), (argv, list(out.rglob("*")))
        assert not any(here.iterdir()), (argv, list(here.iterdir()))


def test_an_incomplete_export_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1}))
    one_line(
        run("generate", "a", "-o", str(tmp_path / "a.wav"), "--artifacts", str(tmp_path)),
        "incomplete manifest (no 'stages')",
    )


def test_offline_the_hub_is_one_line_within_seconds(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    result = run("generate", "funky jazz saxophone", "-o", str(tmp_path / "clip.wav"), env=env, timeout=120)
    one_line(result, "riffusion/riffusion-model-v1", "unreachable", "hf download")
    env["HF_HUB_OFFLINE"] = "1"
    one_line(run("generate", "jazz", "-o", str(tmp_path / "clip.wav"), env=env), "HF_HUB_OFFLINE is set")


def test_denoising_without_a_seed_image_is_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "a.wav"
    result = run(
        "generate", "a", "-o", str(out), *TINY, "--steps", "1", "--width", "64", "--denoising", "0.3"
    )
    assert result.returncode == 0, result.stderr
    assert "--denoising applies to a --seed-image" in result.stderr and out.exists()


def test_a_negative_prompt_with_guidance_off_is_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "a.wav"
    argv = ("generate", "a", "-o", str(out), *TINY, "--profile", "realtime", "--negative-prompt", "noise")
    result = run(*argv, "--steps", "1", "--width", "64")
    assert result.returncode == 0, result.stderr
    assert "--negative-prompt steers guidance, which is off here" in result.stderr and out.exists()


def test_audio_to_image_makes_seed_ready_images(tmp_path: Path) -> None:
    song = tmp_path / "song.wav"
    rate = 44100
    t = np.arange(int(8.005 * rate)) / rate
    soundfile.write(song, (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16), rate)
    whole = run("audio-to-image", str(song), "-o", str(tmp_path / "whole.png"))
    assert whole.returncode == 0, whole.stderr
    assert "801x512" in whole.stdout and "--width 800 makes a seed image" in whole.stdout
    cut = run("audio-to-image", str(song), "-o", str(tmp_path / "seed.png"), "--width", "512")
    assert cut.returncode == 0, cut.stderr
    from PIL import Image
    from riffusion_engine.engine.runtime.seeds import SeedLibrary

    assert Image.open(tmp_path / "seed.png").size == (512, 512)
    one_line(
        run("audio-to-image", str(song), "-o", str(tmp_path / "x.png"), "--width", "904"),
        "--width 904 is wider",
    )
    (tmp_path / "whole.png").unlink()
    (tmp_path / "song.wav").unlink()
    assert SeedLibrary(tmp_path).get("seed").size == (512, 512)  # accepted as a seed image


def test_version_and_bench_default() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("riffusion-engine ")
    assert "default: random:tiny" in run("bench", "--help").stdout


def test_ctrl_c_in_interpolate_keeps_the_clips_made_and_their_join(tmp_path: Path) -> None:
    out = tmp_path / "seq"
    argv = [*CLI, "interpolate", "--start", "a", "--end", "b", "--clips", "50", *TINY, "--steps", "2"]
    process = subprocess.Popen(
        [*argv, "--width", "64", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if line.startswith("clip 1 "):
                break
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted: wrote the" in stdout and "Traceback" not in stderr
    clips = sorted(out.glob("clip_*.wav"))
    joined, _ = soundfile.read(out / "joined.wav", dtype="int16", always_2d=True)
    parts = [soundfile.read(c, dtype="int16", always_2d=True)[0] for c in clips]
    assert len(clips) >= 2 and np.array_equal(joined, np.concatenate(parts))


@pytest.mark.long
def test_ctrl_c_in_stream_exits_130_every_time_and_keeps_the_audio(tmp_path: Path) -> None:
    """Ctrl-C while the stream's thread is inside torch or the audio kernels: exit 130 with
    the audio kept, not an abort in a C++ runtime at shutdown (exit 134), at two moments of
    making a clip."""
    for attempt, delay in enumerate((0.8, 2.4)):
        out = tmp_path / f"s{attempt}.wav"
        argv = [*CLI, "stream", "--start", "a", "--end", "b", *TINY, "--steps", "8", "--duration", "60"]
        process = subprocess.Popen([*argv, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            # Two clips written (into the output's temporary file): the third is being made.
            while time.monotonic() < deadline and not any(
                p.stat().st_size > 800_000 for p in tmp_path.glob(f".s{attempt}.*")
            ):
                time.sleep(0.2)
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        text = stderr.decode(errors="replace")
        assert process.returncode == 130, text[-500:]
        assert "terminate called" not in text and "Traceback" not in text
        assert soundfile.info(out).frames > 0


def test_an_interrupted_demo_leaves_no_empty_folder(tmp_path: Path) -> None:
    """Ctrl-C while demo exports, before it has written anything: the folder it made for
    its outputs is gone again (one it did not make is left as it was)."""
    for made in (True, False):
        out = tmp_path / ("new" if made else "old")
        if not made:
            out.mkdir()
        process = subprocess.Popen(
            [*CLI, "demo", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
        )
        try:
            deadline = time.monotonic() + 120
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # exporting
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 130, stderr.decode(errors="replace")[-800:]
        assert out.exists() is not made and (made or not any(out.iterdir()))


def test_ctrl_c_in_code_built_by_exec_still_exits_130(tmp_path: Path) -> None:
    """Ctrl-C can land while a library runs code it compiled with exec() (dataclasses do, on
    import, as demo's first export imports diffusers): the command still exits 130, not by
    SIGINT. The signal comes at that moment on purpose, through the command line's handler."""
    (tmp_path / "ctrl_c_in_exec.py").write_text(
        "import sys\n"
        "from riffusion_engine.engine.cli import demo\n"
        "def run(args):\n"
        "    exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(30)')\n"
        "demo.run = run\n"
        "from riffusion_engine.engine.cli import main\n"
        "sys.exit(main())\n"
    )
    out = tmp_path / "out"
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ctrl_c_in_exec", "demo", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 130, result.stderr[-800:]
    assert result.stderr.strip().endswith("riffusion-engine demo: interrupted")
    assert time.monotonic() - began < 25  # the handler ran in the sleep, which it cut short
    assert not out.exists()


@pytest.mark.long
def test_sigterm_in_a_long_unet_call_ends_the_process_within_seconds(tmp_path: Path) -> None:
    """A UNet call over a 99992-pixel clip runs for minutes in native code, where Python's
    handler cannot run: the process still ends within a few seconds of SIGTERM, exit 130,
    nothing written."""
    from riffusion_engine.engine.cli import GRACE_S

    out = tmp_path / "wide.wav"
    argv = [*CLI, "generate", "a", *TINY, "--max-width", "100000", "--width", "99992", "--steps", "1"]
    process = subprocess.Popen([*argv, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said = bytearray()

    def read() -> None:
        assert process.stderr is not None
        while chunk := process.stderr.read1(256):
            said.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while b"denoising" not in said and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b"denoising" in said, bytes(said)
        # inside the first UNet call's attention, which runs for minutes: the resnet blocks
        # before it take a second or two here, and the handler runs between their ops
        time.sleep(10)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(10)
    text = said.decode(errors="replace")
    assert process.returncode == 130 and "Traceback" not in text, text[-500:]
    assert text.rstrip().endswith("the process ends now)")
    assert took < GRACE_S + 3, took
    assert not out.exists() and not list(tmp_path.glob(".wide*"))


@pytest.mark.long
def test_a_clip_wider_than_memory_on_the_default_backend_is_one_line(tmp_path: Path) -> None:
    """Wider than the machine's memory: one line with the buffer's size, not ONNX Runtime's
    log and traceback."""
    common = ("--model", "random:tiny", "--cache-dir", str(tmp_path / "cache"))
    wide = run(
        "generate", "a", *common, "--max-width", "16384", "--width", "16384", "-o", str(tmp_path / "w.wav")
    )
    assert wide.returncode == 2 and "Traceback" not in wide.stderr, wide.stderr[-2000:]
    last = wide.stderr.strip().splitlines()[-1]
    assert "16384 pixels need more memory than this machine has (one buffer of 512.0 GiB)" in last, last
    assert "[E:onnxruntime" not in wide.stderr  # its log is not said besides the error
    assert not list(tmp_path.glob("*.wav"))


@pytest.mark.long
def test_the_docs_realtime_export_runs_with_the_realtime_profile(tmp_path: Path) -> None:
    """docs/cli.md and docs/performance.md: ``export --profile realtime -o DIR``, then
    ``generate --artifacts DIR`` (with and without ``--profile realtime``): the export is
    the one the profile runs (OpenVINO's IR), so both run it and say so."""
    out = tmp_path / "tiny-realtime"
    made = run("export", "--model", "random:tiny", "--profile", "realtime", "-o", str(out), timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["target"] == "openvino"
    for extra in ((), ("--profile", "realtime")):
        clip = tmp_path / f"jazz{len(extra)}.wav"
        result = run("generate", "jazz", "--artifacts", str(out), *extra, "-o", str(clip), timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        said = result.stdout.splitlines()[0]
        assert said.startswith("profile realtime: lcm 4 steps, guidance off, backend openvino"), said
        assert soundfile.info(clip).frames > 0


@pytest.mark.long  # a first-use export in a subprocess
def test_a_flag_that_overrides_the_profile_reaches_the_export_it_causes(tmp_path: Path) -> None:
    """--profile realtime --guidance 3: the export made on first use is guided (two UNet
    rows per clip), so the run it was made for is not refused."""
    cache = tmp_path / "cache"
    result = run(
        "generate", "jazz", "--model", "random:tiny", "--profile", "realtime", "--guidance", "3",
        "--backend", "onnxruntime", "--cache-dir", str(cache), "-o", str(tmp_path / "a.wav"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "guidance 3" in result.stdout.splitlines()[0]
    (manifest,) = cache.glob("*/manifest.json")
    assert json.loads(manifest.read_text())["profile"].get("guidance", True) is True  # written when off
    assert (tmp_path / "a.wav").is_file()


def test_what_names_nothing_or_cannot_be_written_is_one_line_before_anything_else(tmp_path: Path) -> None:
    """A bad --vae or LoRA, a scale that is not a number, a cache or export that is a file or
    is missing, an input that is a folder, an output folder that cannot be written: one line
    naming it, exit 2, nothing printed before it (not the profile line) and nothing written."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    out.mkdir()
    wav = str(out / "a.wav")
    cases = [
        (("generate", "a", "-o", wav, *TINY, "--vae", "foo"), ("--vae", "'foo'")),
        (
            ("generate", "a", "-o", wav, *TINY, "--lora", str(tmp_path / "none.safetensors")),
            ("none.safetensors",),
        ),
        (
            ("generate", "a", "-o", wav, *TINY, "--lora", "random:lora:abc"),
            ("the scale 'abc' is not a number",),
        ),
        (
            (
                "generate",
                "a",
                "-o",
                wav,
                "--model",
                "random:tiny",
                "--backend",
                "onnxruntime",
                "--cache-dir",
                str(a_file),
            ),
            ("--cache-dir", "is a file"),
        ),
        (("generate", "a", "-o", wav, "--artifacts", str(tmp_path / "missing")), ("does not exist",)),
        (("generate", "a", "-o", wav, "--artifacts", str(a_file)), ("is a file, not an export directory",)),
        (("image-to-audio", str(tmp_path), "-o", wav), ("is a directory",)),
        (("generate", "(jazz:1e30) funk", "-o", wav, *TINY), ("emphasis weight of 'jazz' is 1e+30",)),
        (("generate", "a", "-o", wav, *TINY, "--lora", "random:lora:1e30"), ("scale", "at most 100")),
        (("generate", "a", "-o", "/proc/riffusion.wav", *TINY, "--steps", "1"), ("cannot write in '/proc'",)),
    ]
    for argv, needles in cases:
        result = run(*argv)
        one_line(result, *needles)
        assert result.stdout == "", (argv, result.stdout)
        assert not any(out.iterdir()), (argv, list(out.iterdir()))


@pytest.mark.long  # commands as subprocesses, one with a fused LoRA
def test_non_finite_weights_are_refused_and_a_non_finite_clip_is_never_written(tmp_path: Path) -> None:
    """A LoRA file holding NaN is refused, naming the flag and the weight; one whose finite
    weights overflow once fused makes NaN spectrograms, which the engine refuses instead of
    writing a black image and full-scale noise with exit 0."""
    import safetensors.torch
    from riffusion_engine.export.adapters import random_lora
    from riffusion_engine.export.models import load_components

    weights = random_lora(load_components("random:tiny").unet, seed=1)
    first = next(iter(weights))
    nan = {k: v.clone().contiguous() for k, v in weights.items()}
    nan[first][0] = float("nan")
    safetensors.torch.save_file(nan, tmp_path / "nan.safetensors")
    huge = {k: (v * 1e30).contiguous() for k, v in weights.items()}
    safetensors.torch.save_file(huge, tmp_path / "huge.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    argv = ("generate", "a", "-o", str(out / "a.wav"), *TINY, "--steps", "2", "--lora")
    one_line(run(*argv, str(tmp_path / "nan.safetensors")), "--lora", "nan.safetensors", first, "NaN or inf")
    result = run(*argv, str(tmp_path / "huge.safetensors"))  # after the progress bar: the clip was made
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the model's output holds NaN or inf" in result.stderr.strip().splitlines()[-1]
    assert not any(out.iterdir())


def test_a_stray_flag_is_refused_by_its_commands_parser(tmp_path: Path) -> None:
    result = run("generate", "a", "-o", str(tmp_path / "a.wav"), "--bogus")
    assert result.returncode == 2 and "usage: riffusion-engine generate" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "riffusion-engine generate: error: unrecognized arguments: --bogus"
