"""Shared fixtures: Riffusion's parameters and a music-like signal, built once per session."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from riffusion_engine import load
from riffusion_engine.kernels import SpectrogramParams
from riffusion_engine.kernels.audio import spectrogram_from_waveform
from riffusion_engine.kernels.synth import music_like


@functools.cache
def _cuda_device() -> str | None:
    """Why the GPU tests cannot run here, or None when a CUDA device is usable."""
    try:
        import torch

        return None if torch.cuda.is_available() else "no CUDA GPU (torch sees none)"
    except ImportError:
        pass
    try:
        import cupy

        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA GPU"
    except Exception as exc:
        return f"no CUDA GPU ({type(exc).__name__})"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allow-no-gpu",
        action="store_true",
        help="let the selected gpu tests skip where no CUDA device is usable (without it such a run fails)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """A run that selected ``gpu`` tests (``pytest -m gpu``) fails at once, in one line,
    where no CUDA device is usable: skipping all of them would pass having run nothing.
    ``--allow-no-gpu`` lets them skip instead."""
    if session.config.getoption("allow_no_gpu") or session.config.getoption("collectonly"):
        return
    selected = sum(item.get_closest_marker("gpu") is not None for item in session.items)
    reason = _cuda_device() if selected else None
    if reason is not None:
        pytest.exit(
            f"{selected} gpu test(s) selected and {reason}: nothing would run on a GPU "
            "(--allow-no-gpu skips them instead)",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``gpu`` tests skip, saying why, where no CUDA device is usable (``--allow-no-gpu``)."""
    if item.get_closest_marker("gpu") is not None:
        reason = _cuda_device()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def params() -> SpectrogramParams:
    return SpectrogramParams()


@pytest.fixture(scope="session")
def music(params: SpectrogramParams) -> np.ndarray:
    """5.11 s mono, (1, samples) float32 on the int16 scale: a 512-column image."""
    from riffusion_engine.engine.tools import reference

    return reference.music(params)


@pytest.fixture(scope="session")
def short_music(params: SpectrogramParams) -> np.ndarray:
    """1.5 s mono: enough frames for Griffin-Lim tests that run many times."""
    return music_like(1.5, sample_rate=params.sample_rate, seed=2)


@pytest.fixture(scope="session")
def music_mel(music: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    return spectrogram_from_waveform(music, params)


@pytest.fixture(scope="session")
def tiny():
    """random:tiny's components (torch), built once."""
    pytest.importorskip("torch")
    from riffusion_engine.export.models import load_components

    return load_components("random:tiny")


@pytest.fixture(scope="session")
def torch_engine():
    """An Engine over random:tiny on the torch backend, built once."""
    pytest.importorskip("torch")

    return load("random:tiny", backend="torch")


def reference_pipeline(components, kind: str = "text", scheduler: str = "pndm"):
    """diffusers' own pipeline (text to image, or ``img2img``) over the same components,
    with the scheduler the engine names ``scheduler``."""
    from riffusion_engine.engine.tools.reference import diffusers_scheduler
    from riffusion_engine.export.models import diffusers_pipeline

    sched = diffusers_scheduler(components, scheduler)
    return diffusers_pipeline(components, img2img=kind == "img2img", scheduler=sched)


def needs(module: str) -> None:
    """Skip the test where ``module`` is not installed (a GPU test's optional library)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed")


def needs_provider(provider: str) -> None:
    """Skip the test where ONNX Runtime lacks ``provider`` (its CPU build has no GPU ones)."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        pytest.skip(f"ONNX Runtime lacks {provider}")


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``riffusion-engine ARGV`` in this process: exit code, stdout, stderr."""
    from riffusion_engine.engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


TINY_EXPORT_ARGS = ("--model", "random:tiny", "--max-width", "1024")  # the session export's settings


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> tuple[Path, str]:
    """`riffusion-engine export --model random:tiny -o DIR --max-width 1024`, once per
    session: the directory and what the command printed."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("export") / "tiny"
    code, stdout, stderr = run_cli("export", *TINY_EXPORT_ARGS, "-o", str(out), "-q")
    assert code == 0, stderr
    return out, stdout
