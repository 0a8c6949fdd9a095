"""The CuPy path against the NumPy path (needs an NVIDIA GPU: ``pytest -m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
from riffusion_engine.kernels import (
    GriffinLimOptions,
    SpectrogramParams,
    audio_from_spectrogram,
    spectral_convergence,
)
from riffusion_engine.kernels.audio import spectrogram_from_waveform
from riffusion_engine.kernels.griffin_lim import waveform_from_mel
from riffusion_engine.kernels.stft import istft, stft

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")


def test_stft_istft_match_numpy() -> None:
    x = np.random.default_rng(0).standard_normal((2, 20000)).astype(np.float32)
    ours = stft(cupy.asarray(x), n_fft=1764, hop_length=44, win_length=441, xp=cupy)
    ref = stft(x, n_fft=1764, hop_length=44, win_length=441)
    np.testing.assert_allclose(ours.get(), ref, atol=2e-3 * np.abs(ref).max())
    back = istft(ours, n_fft=1764, hop_length=44, win_length=441, length=20000, xp=cupy)
    np.testing.assert_allclose(
        back.get(), istft(ref, n_fft=1764, hop_length=44, win_length=441, length=20000), atol=1e-3
    )


@pytest.mark.parametrize("options", [GriffinLimOptions(init="random"), GriffinLimOptions.plain(n_iter=8)])
def test_waveform_matches_numpy(music_mel: np.ndarray, params: SpectrogramParams, options) -> None:
    cpu = waveform_from_mel(music_mel, params, options)
    gpu = waveform_from_mel(cupy.asarray(music_mel), params, options, xp=cupy).get()
    assert gpu.shape == cpu.shape
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-3


def test_initial_phase_matches_numpy(music_mel: np.ndarray, params: SpectrogramParams) -> None:
    """The phase-gradient start makes discrete choices (peaks), so a last-bit
    difference may move a few coefficients; nearly all agree, and the waveform
    is as good as the CPU's."""
    from riffusion_engine.kernels.griffin_lim import grid_magnitude, iteration_grid
    from riffusion_engine.kernels.phase import pghi_phase

    grid = iteration_grid(params, GriffinLimOptions())
    linear = grid_magnitude(music_mel, params, grid)
    cpu = pghi_phase(linear, grid.plan)
    gpu = pghi_phase(cupy.asarray(linear), grid.plan, xp=cupy).get()
    assert np.mean(np.abs(gpu - cpu) < 1e-2) > 0.99
    waveform_cpu = waveform_from_mel(music_mel, params)
    waveform_gpu = waveform_from_mel(cupy.asarray(music_mel), params, xp=cupy).get()
    assert spectral_convergence(waveform_gpu, music_mel, params) < 1.05 * spectral_convergence(
        waveform_cpu, music_mel, params
    )


def test_cuda_tensor_is_not_copied_to_host(music_mel: np.ndarray, params: SpectrogramParams) -> None:
    torch = pytest.importorskip("torch")
    from riffusion_engine.kernels import xp as xpm

    tensor = torch.from_numpy(music_mel).cuda()
    view = xpm.as_array(tensor, cupy)
    assert view.data.ptr == tensor.data_ptr()  # DLPack: the same device memory
    audio = audio_from_spectrogram(tensor, params)  # device inferred from the tensor
    assert audio.shape == (1, params.num_samples(music_mel.shape[-1]))


def test_spectrogram_matches_numpy(music: np.ndarray, params: SpectrogramParams) -> None:
    cpu = spectrogram_from_waveform(music, params)
    gpu = spectrogram_from_waveform(cupy.asarray(music), params, xp=cupy).get()
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3 * cpu.max())


def test_cached_constants_are_copied_per_stream(music_mel: np.ndarray, params: SpectrogramParams) -> None:
    """The kernels' cached constants (window, inverse filterbank, phase start) are one
    device copy per CUDA stream, and two sessions' audio made at once on their own
    non-blocking streams each equals NumPy's."""
    import threading

    from riffusion_engine.kernels.mel import inverse_filterbank

    first, second = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    with first:
        a = inverse_filterbank(params, 1, 1024, cupy)
        again = inverse_filterbank(params, 1, 1024, cupy)
    with second:
        b = inverse_filterbank(params, 1, 1024, cupy)
    assert a is again and b is not a and b.data.ptr != a.data.ptr
    host = inverse_filterbank(params, 1, 1024, np)
    np.testing.assert_array_equal(a.get(), host)
    np.testing.assert_array_equal(b.get(), host)

    options = GriffinLimOptions(init="random", n_iter=16)
    want = waveform_from_mel(music_mel, params, options)
    got: dict[int, np.ndarray] = {}

    def session(index: int, stream) -> None:
        with stream:
            got[index] = waveform_from_mel(cupy.asarray(music_mel), params, options, xp=cupy).get()

    threads = [threading.Thread(target=session, args=(i, s)) for i, s in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert np.linalg.norm(got[index] - want) / np.linalg.norm(want) < 1e-3
