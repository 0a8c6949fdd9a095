"""The reference implementations the engine is measured and checked against.

- ``ReferencePipeline``: diffusers' ``StableDiffusionPipeline`` in fp32 eager mode over the
  model's components, each stage timed, followed by ``reference_audio``.
- ``reference_audio``: the original image -> audio conversion as maintained libraries
  implement it: the inverse mel scale as torchaudio's ``InverseMelScale`` computes it (least
  squares against the filterbank, clipped at zero; here with NumPy and librosa's HTK
  filterbank, ``librosa_mel_basis``), then librosa's Griffin-Lim (momentum 0.99, 32
  iterations, random initial phase) at Riffusion's full rate and FFT size.
- ``reference_converter``: the original Riffusion converter's algorithm through torchaudio
  (``InverseMelScale`` + ``GriffinLim``, Riffusion's settings).
- ``original_image_pixels``: Riffusion's audio -> image, with librosa's STFT and filterbank.
- ``reference_engine``: the torch backend on the CPU in fp32, itself equal to diffusers'
  pipeline (``tests/test_runtime.py``): what ``doctor`` compares every other path with.
- ``music``, ``music_mel``: the synthesized clip the measurements and checks share.

librosa, torchaudio, torch and diffusers are imported where they are used: importing this
module needs none of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError
from ...kernels.params import SpectrogramParams
from ..runtime.defaults import HEIGHT, WIDTH

Converter = Callable[[np.ndarray, int], np.ndarray]  # (mel, seed) -> waveform (channels, samples)

MUSIC_SECONDS = 5.11  # one 512-column image at Riffusion's rate
ORIGINAL_MEL_ITERS = 200  # Riffusion's SpectrogramParams.max_mel_iters


# -- the inputs -------------------------------------------------------------------------------


def music(params: SpectrogramParams) -> np.ndarray:
    """5.11 s of synthesized music (seed 1), ``(1, samples)`` on the int16 scale."""
    from ...kernels.synth import music_like

    return music_like(MUSIC_SECONDS, sample_rate=params.sample_rate, seed=1)


def music_mel(params: SpectrogramParams, *, through_image: bool) -> np.ndarray:
    """``music``'s mel spectrogram ``(channels, mels, frames)``; with ``through_image``, as
    decoded from its Riffusion image (the 8-bit rounding a generated image carries)."""
    from ...kernels.audio import spectrogram_from_waveform
    from ...kernels.convert import image_from_audio
    from ...kernels.image import spectrogram_from_image

    samples = music(params)
    if not through_image:
        return spectrogram_from_waveform(samples, params)
    return spectrogram_from_image(image_from_audio(samples, params.sample_rate, params))[0]


# -- the diffusion pipeline -------------------------------------------------------------------


class _Timer:
    """Wall time of a module's forward calls, through forward hooks."""

    def __init__(self, module: Any, sync: Callable[[], None]) -> None:
        self.calls: list[float] = []
        self._sync = sync
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *args: Any) -> None:
        self._begin = time.perf_counter()

    def _post(self, *args: Any) -> None:
        self._sync()
        self.calls.append(time.perf_counter() - self._begin)

    def take(self) -> list[float]:
        calls, self.calls = self.calls, []
        return calls


def diffusers_scheduler(components: Any, name: str) -> Any:
    """diffusers' scheduler that the engine calls ``name``, built from the components'
    config as a diffusers pipeline is given it (without the engine's own corrections)."""
    import diffusers

    from ..runtime.requests import SCHEDULERS

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**dict(components.scheduler.config), **overrides})


class ReferencePipeline:
    """diffusers' pipeline (fp32 eager) plus the original audio conversion (librosa)."""

    def __init__(self, model: str, device: str = "cpu", *, choices: Any = None) -> None:
        """``choices`` (a profile's, :class:`Choices`): its LoRAs fused by diffusers, its
        VAE (AutoencoderTiny) and its scheduler; None: the model as published, PNDM."""
        import torch

        from ...export.adapters import Variant
        from ...export.models import diffusers_pipeline, load_components
        from ..runtime.requests import STEP_OPTIONS

        variant = Variant(choices.loras, choices.vae) if choices is not None else None
        components = load_components(model, seed=0, variant=variant)
        scheduler = None
        self.step_options: dict[str, Any] = {}
        if choices is not None:
            scheduler = diffusers_scheduler(components, choices.scheduler)
            self.step_options = dict(STEP_OPTIONS.get(choices.scheduler, {}))
        self.pipe = diffusers_pipeline(components, scheduler=scheduler).to(device)
        # img2img over the same modules (the timers below see both pipelines' calls)
        self.img2img = diffusers_pipeline(components, img2img=True, scheduler=self.pipe.scheduler).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.timers = {
            "text_encoder": _Timer(self.pipe.text_encoder, sync),
            "unet_step": _Timer(self.pipe.unet, sync),
            "vae_decoder": _Timer(self.pipe.vae.decoder, sync),
        }
        self._torch = torch

    def run(
        self,
        prompt: str,
        *,
        steps: int,
        guidance: float,
        seed: int,
        seed_image: Any = None,
        denoising: float = 0.75,
    ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """Seconds per stage (``text_encoder`` and ``vae_decoder`` in all, ``unet_step`` per
        UNet call, ``image_to_audio``, ``end_to_end``), the image's pixels (uint8) and the
        audio (int16); from ``seed_image`` at ``denoising`` when given (img2img)."""
        start = time.perf_counter()
        if seed_image is None:
            pipe, inputs = self.pipe, {"height": HEIGHT, "width": WIDTH}
        else:
            pipe, inputs = self.img2img, {"image": seed_image, "strength": denoising}
        image = pipe(
            prompt,
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=self._torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **inputs,
            **self.step_options,
        ).images[0]
        pixels = (image * 255).round().astype(np.uint8)
        begin_audio = time.perf_counter()
        audio = reference_audio(pixels)
        end = time.perf_counter()
        seconds = {
            "text_encoder": sum(self.timers["text_encoder"].take()),
            "unet_step": float(np.mean(self.timers["unet_step"].take())),
            "vae_decoder": sum(self.timers["vae_decoder"].take()),
            "image_to_audio": end - begin_audio,
            "end_to_end": end - start,
        }
        return seconds, pixels, audio


def reference_engine(model: str = "random:tiny") -> Any:
    """The torch backend on the CPU in fp32: the engine's reference run."""
    from ..runtime.loading import load

    return load(model, backend="torch")


# -- audio: librosa ---------------------------------------------------------------------------


def _librosa() -> Any:
    try:
        import librosa
    except ImportError as exc:
        raise RiffusionError("the reference audio conversion needs librosa: pip install librosa") from exc
    return librosa


def librosa_mel_basis(params: SpectrogramParams) -> np.ndarray:
    """Riffusion's mel filterbank ``(mels, bins)`` as librosa computes it (HTK scale, no
    norm): the references' filterbank, independent of the engine's own."""
    return _librosa().filters.mel(
        sr=params.sample_rate,
        n_fft=params.n_fft,
        n_mels=params.num_frequencies,
        fmin=params.min_frequency,
        fmax=params.max_frequency,
        htk=True,
        norm=None,
    )


def reference_audio(pixels: np.ndarray) -> np.ndarray:
    """The original image -> audio algorithm through librosa (int16, Riffusion's loudness)."""
    librosa = _librosa()
    from ...kernels.audio import normalize_like_riffusion
    from ...kernels.image import spectrogram_from_pixels
    from ...kernels.params import DEFAULT_MAX_VALUE

    params = SpectrogramParams()
    mel = spectrogram_from_pixels(pixels, params, max_value=DEFAULT_MAX_VALUE)[0].astype(np.float64)
    # torchaudio's InverseMelScale: the least-squares solve against the filterbank, clipped
    # at zero. (librosa's own NNLS inverse would need about 80 GiB at this FFT size.)
    basis = librosa_mel_basis(params).astype(np.float64)  # (mels, bins)
    linear = np.maximum(np.linalg.lstsq(basis, mel, rcond=None)[0], 0)  # (bins, frames)
    waveform = librosa.griffinlim(
        linear,
        n_iter=params.num_griffin_lim_iters,
        hop_length=params.hop_length,
        win_length=params.win_length,
        window="hann",
        center=True,
        momentum=0.99,
        init="random",
        random_state=0,
    )
    return normalize_like_riffusion(waveform[None].astype(np.float32))


def original_image_pixels(samples: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """Riffusion's audio -> image, written from its description with librosa as the
    STFT and filterbank: |STFT| -> HTK mel (no norm) -> /max -> ** 0.25 -> *255 ->
    255 - x -> uint8 -> gray to RGB -> flip."""
    stft = {"n_fft": params.n_fft, "hop_length": params.hop_length, "win_length": params.win_length}
    spec = np.abs(_librosa().stft(samples, **stft, window="hann", center=True, pad_mode="reflect"))
    mel = (librosa_mel_basis(params) @ spec).astype(np.float32)  # (channels, mels, frames)
    data = mel / np.max(mel)
    data = np.power(data, params.power_for_image)
    data = 255 - data * 255
    data = data.astype(np.uint8)
    rgb = (
        np.stack([data[0]] * 3, axis=-1)
        if data.shape[0] == 1
        else np.stack([np.zeros_like(data[0]), data[0], data[1]], axis=-1)
    )
    return rgb[::-1]


# -- audio: the original converter through torchaudio -------------------------------------


def reference_converter(params: SpectrogramParams) -> Converter:
    """The original Riffusion converter's algorithm, through torchaudio. With torchaudio
    < 2.1 the inverse mel is the original's 200 SGD iterations; later torchaudio solves it
    by least squares (``reference_algorithm`` names which)."""
    try:
        import torch
        import torchaudio
    except ImportError as exc:
        raise RiffusionError(
            "the reference needs torchaudio matching torch, e.g. in a separate venv: "
            "pip install torch==2.9.1 'torchaudio==2.9.*' -e ."
        ) from exc
    inverse_mel = torchaudio.transforms.InverseMelScale(
        n_stft=params.n_fft // 2 + 1,
        n_mels=params.num_frequencies,
        sample_rate=params.sample_rate,
        f_min=params.min_frequency,
        f_max=params.max_frequency,
        norm=params.mel_scale_norm,
        mel_scale=params.mel_scale_type,
        **_original_inverse_mel_settings(torchaudio),
    )
    griffin_lim = torchaudio.transforms.GriffinLim(
        n_fft=params.n_fft,
        n_iter=params.num_griffin_lim_iters,
        win_length=params.win_length,
        hop_length=params.hop_length,
        window_fn=torch.hann_window,
        power=1.0,
        momentum=0.99,
        rand_init=True,
    )

    def convert(mel: np.ndarray, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        linear = inverse_mel(torch.from_numpy(mel))  # the SGD inverse needs autograd
        with torch.inference_mode():
            return griffin_lim(linear).numpy()

    return convert


def _original_inverse_mel_settings(torchaudio: Any) -> dict[str, Any]:
    """The original converter's SGD settings where the installed torchaudio still
    solves the inverse by SGD (torchaudio < 2.1); later versions solve it by
    least squares and take none of them."""
    import inspect

    signature = inspect.signature(torchaudio.transforms.InverseMelScale)
    if "max_iter" not in signature.parameters:
        return {}
    return {"max_iter": ORIGINAL_MEL_ITERS, "tolerance_loss": 1e-5, "tolerance_change": 1e-8, "sgdargs": None}


def reference_algorithm() -> str:
    """How the installed torchaudio inverts the mel scale (for the report)."""
    import torchaudio

    if _original_inverse_mel_settings(torchaudio):
        return (
            f"torchaudio {torchaudio.__version__}: InverseMelScale by SGD "
            f"({ORIGINAL_MEL_ITERS} iterations, as the original converter) + GriffinLim"
        )
    return f"torchaudio {torchaudio.__version__}: InverseMelScale by least squares + GriffinLim"
