"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import run_cli
from riffusion_engine.kernels.synth import music_like

CLI = [sys.executable, "-m", "riffusion_engine.engine.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def wav_22k_stereo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    samples = music_like(1.2, sample_rate=22050, stereo=True)
    soundfile.write(path, samples.T.astype(np.int16), 22050)
    return path


def test_audio_to_image_to_audio(tmp_path: Path, wav_22k_stereo: Path) -> None:
    png = tmp_path / "clip.png"
    result = run("audio-to-image", str(wav_22k_stereo), "-o", str(png))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(png).size == (121, 512)
    for suffix in (".wav", ".flac", ".ogg", ".mp3"):
        out = tmp_path / f"clip{suffix}"
        result = run("image-to-audio", str(png), "-o", str(out), "--iters", "4")
        assert result.returncode == 0, result.stderr
        data, rate = soundfile.read(out)
        assert rate == 44100 and len(data) > 40000


def test_stereo_flag_keeps_two_channels(tmp_path: Path, wav_22k_stereo: Path) -> None:
    png, wav = tmp_path / "s.png", tmp_path / "s.wav"
    assert run("audio-to-image", str(wav_22k_stereo), "-o", str(png), "--stereo").returncode == 0
    assert run("image-to-audio", str(png), "-o", str(wav), "--iters", "2").returncode == 0
    assert soundfile.info(wav).channels == 2


def test_init_option_selects_the_initial_phase(tmp_path: Path, wav_22k_stereo: Path) -> None:
    png = tmp_path / "clip.png"
    assert run("audio-to-image", str(wav_22k_stereo), "-o", str(png)).returncode == 0
    outputs = {}
    for name, extra in (("default", ()), ("pghi", ("--init", "pghi")), ("random", ("--init", "random"))):
        out = tmp_path / f"{name}.wav"
        result = run("image-to-audio", str(png), "-o", str(out), "--iters", "2", *extra)
        assert result.returncode == 0, result.stderr
        outputs[name] = soundfile.read(out)[0]
    assert np.array_equal(outputs["default"], outputs["pghi"])
    assert not np.array_equal(outputs["pghi"], outputs["random"])
    assert run("image-to-audio", str(png), "-o", str(tmp_path / "x.wav"), "--init", "zero").returncode != 0


def _expect_clean_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0]


def test_error_cases(tmp_path: Path, wav_22k_stereo: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not media")
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1), np.int16), 44100)
    from PIL import Image

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 512)).save(tiny)
    cases = [
        (("audio-to-image", str(tmp_path / "missing.wav")), "does not exist"),
        (("audio-to-image", str(text)), "not a readable audio file"),
        (("audio-to-image", str(empty)), "no audio samples"),
        (("image-to-audio", str(tmp_path / "missing.png")), "does not exist"),
        (("image-to-audio", str(text)), "not a readable image"),
        (("image-to-audio", str(tiny)), "too small to hold a frame"),
    ]
    for args, needle in cases:
        out = tmp_path / ("out.png" if args[0] == "audio-to-image" else "out.wav")
        _expect_clean_error(run(*args, "-o", str(out)), needle)
        assert not out.exists()
    missing_dir = tmp_path / "nope" / "out.png"
    _expect_clean_error(run("audio-to-image", str(wav_22k_stereo), "-o", str(missing_dir)), "does not exist")
    _expect_clean_error(run("image-to-audio", str(tiny), "-o", str(tmp_path / "x.xyz")), "extension")
    assert list(tmp_path.glob(".out*")) == []  # no temporary files left behind


def test_roundtrip(tmp_path: Path) -> None:
    result = run("roundtrip", "-o", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    for name in ("source.wav", "spectrogram.png", "roundtrip.wav"):
        assert (tmp_path / "demo" / name).is_file()
    assert "image -> audio" in result.stdout


# -- first contact: bad arguments stop at once, with one line and no file ---------------


def _no_files(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["roundtrip", "-o", "{out}", "--device", "cuda"], "cuda"),
        (["demo", "-o", "{out}", "--steps", "0"], "steps must be an integer"),
        (["interpolate", "--start", "", "--end", "jazz", "--model", "random:tiny", "--backend", "torch",
          "-o", "{out}"], "prompt"),
        (["bench", "--device", "cuda", "--model", "random:tiny", "--cache-dir", "{out}"], "cuda"),
        (["generate", "x", "--device", "cuda", "--model", "random:tiny", "-o", "{out}.wav"], "cuda"),
        (["serve", "--model", "random:tiny", "--port", "99999"], "port must be 0..65535"),
        (["serve", "--model", "random:tiny", "--seed-images", "{out}/missing"], "does not exist"),
    ],
)  # fmt: skip
def test_bad_arguments_stop_before_any_work(tmp_path: Path, argv: list[str], message: str) -> None:
    pytest.importorskip("torch")
    import time

    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "out"
    begin = time.perf_counter()
    code, stdout, err = run_cli(*[a.replace("{out}", str(out)) for a in argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not stdout.startswith("serving")
    assert _no_files(out), list(out.iterdir())
    assert not out.with_suffix(".wav").exists()
    assert time.perf_counter() - begin < 20  # no export, no model load, no denoising


def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, stdout, err = run_cli("serve", "--model", "random:full", "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and not stdout


def test_a_file_where_a_folder_is_written_says_what_was_expected(tmp_path: Path) -> None:
    song = tmp_path / "song.wav"
    song.write_bytes(b"mine")
    code, _, err = run_cli("roundtrip", "-o", str(song))
    assert code == 2 and "is a file; this command writes a directory there" in err
    assert song.read_bytes() == b"mine"


def test_verbose_after_the_command(tmp_path: Path) -> None:
    from riffusion_engine.engine.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["roundtrip", "-v"]).verbose
    assert parser.parse_args(["-v", "roundtrip"]).verbose
    assert not parser.parse_args(["roundtrip"]).verbose


def test_outputs_get_the_mode_the_umask_allows(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        code, _, err = run_cli("roundtrip", "-o", str(tmp_path / "rt"))
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("source.wav", "spectrogram.png", "roundtrip.wav"):
        assert stat.S_IMODE((tmp_path / "rt" / name).stat().st_mode) == 0o644


def test_every_help_shows_the_defaults() -> None:
    """Each option with a default says it in --help (its own words, or argparse's)."""
    import argparse

    from riffusion_engine.engine.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for name, sub in commands.choices.items():
        for action in sub._actions:
            default = action.default
            if (
                not action.option_strings
                or default is None
                or default is False
                or default in ([], argparse.SUPPRESS)
            ):
                continue
            assert "default" in sub._get_formatter()._get_help_string(action), (name, action.option_strings)
            checked += 1
    assert checked > 40


def test_benchmark_scripts_say_what_to_do_first(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    for script, advice in (
        ("bench_unet.py", "riffusion-engine export"),
        ("bench_int8.py", "--target openvino --precision int8"),
    ):
        result = subprocess.run(
            [sys.executable, str(root / script), "--artifacts", str(tmp_path / "none")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2 and advice in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    for script in ("bench_unet.py", "bench_serve.py", "bench_audio.py", "bench_int8.py"):
        text = subprocess.run(
            [sys.executable, str(root / script), "--help"], capture_output=True, text=True, timeout=120
        ).stdout
        doc = (root / script).read_text().split('"""')[1].strip().splitlines()[-1].strip()
        assert doc in text, script  # the whole description, to its last line


@pytest.mark.long
def test_third_party_warnings_stay_quiet_unless_verbose(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    argv = ["generate", "a beat", "--model", "random:tiny", "--backend", "torch", "--steps", "1"]
    result = run(*argv, "-o", str(tmp_path / "a.wav"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if "denoising" not in line]
    assert not [line for line in lines if "warn" in line.lower()], lines
