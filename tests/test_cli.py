"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
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
