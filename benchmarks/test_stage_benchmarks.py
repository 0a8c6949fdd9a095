"""pytest-benchmark suite for the kernels and the stages (not part of the default test run):

    pytest benchmarks/test_stage_benchmarks.py

Kernels on a 512x512 spectrogram (5.11 s of audio); stages on random:tiny through the
torch and ONNX Runtime backends. pytest-benchmark's table gives min/median/max per case.
"""

from __future__ import annotations

import numpy as np
import pytest
from riffusion_engine.engine.tools import reference
from riffusion_engine.kernels import GriffinLimOptions, SpectrogramParams
from riffusion_engine.kernels.audio import spectrogram_from_waveform
from riffusion_engine.kernels.convert import audio_from_spectrogram
from riffusion_engine.kernels.griffin_lim import waveform_from_mel
from riffusion_engine.kernels.stft import stft

PARAMS = SpectrogramParams()


@pytest.fixture(scope="module")
def music() -> np.ndarray:
    return reference.music(PARAMS)


@pytest.fixture(scope="module")
def mel() -> np.ndarray:
    return reference.music_mel(PARAMS, through_image=True)


def test_stft(benchmark, music: np.ndarray) -> None:
    benchmark(stft, music, n_fft=PARAMS.n_fft, hop_length=PARAMS.hop_length, win_length=PARAMS.win_length)


def test_audio_to_spectrogram(benchmark, music: np.ndarray) -> None:
    benchmark(spectrogram_from_waveform, music, PARAMS)


def test_griffin_lim_default(benchmark, mel: np.ndarray) -> None:
    benchmark(waveform_from_mel, mel, PARAMS, GriffinLimOptions())


def test_griffin_lim_plain(benchmark, mel: np.ndarray) -> None:
    benchmark.pedantic(waveform_from_mel, args=(mel, PARAMS, GriffinLimOptions.plain()), rounds=3)


def test_image_to_audio(benchmark, mel: np.ndarray) -> None:
    benchmark(audio_from_spectrogram, mel, PARAMS)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from riffusion_engine import load

    cache = tmp_path_factory.mktemp("exports")
    return {name: load("random:tiny", backend=name, cache_dir=cache) for name in ("torch", "onnxruntime")}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("stage", ["text_encoder", "unet", "vae_decoder"])
def test_stage(benchmark, engines, backend: str, stage: str) -> None:
    import torch

    engine = engines[backend]
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "text_encoder": {"input_ids": torch.randint(0, 500, (2, 77), generator=generator, dtype=torch.int32)},
        "unet": {
            "sample": torch.randn(2, 4, 64, 64, generator=generator),
            "timestep": torch.tensor([500.0, 500.0]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
        },
        "vae_decoder": {"latent": torch.randn(1, 4, 64, 64, generator=generator)},
    }[stage]
    benchmark(engine.backend.run, stage, inputs)
