"""Riffusion's image format: layout, EXIF, round trips, and agreement with the
original algorithm re-implemented independently (librosa STFT and filterbank)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from riffusion_engine.engine.tools.reference import original_image_pixels
from riffusion_engine.kernels import RiffusionError, SpectrogramParams, image_from_audio
from riffusion_engine.kernels.image import (
    image_from_spectrogram,
    load_image,
    pixels_from_spectrogram,
    save_image,
    spectrogram_from_image,
)
from riffusion_engine.kernels.params import DEFAULT_MAX_VALUE, ExifTag
from riffusion_engine.kernels.synth import music_like


@pytest.mark.parametrize("stereo", [False, True])
def test_images_match_the_original_algorithm(stereo: bool) -> None:
    params = SpectrogramParams(stereo=stereo)
    samples = music_like(5.11, seed=5, stereo=stereo)
    ours = np.asarray(image_from_audio(samples, params.sample_rate, params))
    expected = original_image_pixels(samples, params)
    assert ours.shape == expected.shape == (512, 512, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert (diff <= 1).mean() >= 0.99


def test_mono_layout_and_orientation(params: SpectrogramParams) -> None:
    mel = np.zeros((1, params.num_frequencies, 30), np.float32)
    mel[0, 5, :] = 1.0  # a loud low band
    pixels, max_value = pixels_from_spectrogram(mel, params)
    assert max_value == 1.0
    assert np.all(pixels[..., 0] == pixels[..., 1]) and np.all(pixels[..., 1] == pixels[..., 2])
    # Loud is dark; low frequencies at the bottom.
    assert np.all(pixels[params.num_frequencies - 1 - 5, :, 0] == 0)
    assert np.all(np.delete(pixels, params.num_frequencies - 1 - 5, axis=0) == 255)


def test_stereo_layout(params: SpectrogramParams) -> None:
    stereo = params.replace(stereo=True)
    mel = np.zeros((2, stereo.num_frequencies, 30), np.float32)
    mel[0, 10] = 1.0
    mel[1, 20] = 1.0
    pixels, _ = pixels_from_spectrogram(mel, stereo)
    assert np.all(pixels[..., 0] == 0)
    assert np.all(pixels[-1 - 10, :, 1] == 0) and np.all(pixels[-1 - 20, :, 2] == 0)
    assert np.all(pixels[-1 - 20, :, 1] == 255)


@pytest.mark.parametrize("stereo", [False, True])
def test_spectrogram_image_round_trip(tmp_path, stereo: bool) -> None:
    params = SpectrogramParams(stereo=stereo)
    rng = np.random.default_rng(0)
    mel = (rng.random((params.channels, params.num_frequencies, 40)) ** 3 * 1e6).astype(np.float32)
    image = image_from_spectrogram(mel, params)
    path = save_image(image, tmp_path / "spec.png")
    loaded = load_image(path)
    back, loaded_params = spectrogram_from_image(loaded)
    assert loaded_params == params
    # Within the 8-bit quantisation of x ** 0.25: one gray level up to max.
    level = np.power((back / mel.max()), params.power_for_image) * 255
    expected = np.power(mel / mel.max(), params.power_for_image) * 255
    assert np.abs(level - expected).max() <= 1.0 + 1e-3
    # And re-encoding gives the same pixels.
    again, _ = pixels_from_spectrogram(back, params, max_value=float(mel.max()))
    assert np.mean(again == np.asarray(loaded)) > 0.99


def test_exif_round_trip_with_riffusion_tags(tmp_path) -> None:
    params = SpectrogramParams(stereo=True, max_frequency=9000, power_for_image=0.3, num_frequencies=256)
    mel = np.ones((2, 256, 40), np.float32)
    path = save_image(image_from_spectrogram(mel, params, max_value=1234.5), tmp_path / "x.png")
    exif = Image.open(path).getexif()
    assert exif[ExifTag.SAMPLE_RATE] == 44100
    assert exif[ExifTag.MAX_FREQUENCY] == 9000
    assert exif[ExifTag.NUM_FREQUENCIES] == 256
    assert abs(float(exif[ExifTag.MAX_VALUE]) - 1234.5) < 1e-9
    assert SpectrogramParams.from_exif(exif) == params


def test_image_without_exif_gets_defaults(tmp_path) -> None:
    gray = Image.fromarray(np.full((512, 100), 200, np.uint8), mode="L")
    gray.save(tmp_path / "plain.png")
    mel, params = spectrogram_from_image(load_image(tmp_path / "plain.png"))
    assert params == SpectrogramParams()
    expected = ((255 - 200) / 255) ** 4 * DEFAULT_MAX_VALUE
    np.testing.assert_allclose(mel, expected, rtol=1e-5)


def test_bad_images(tmp_path, params: SpectrogramParams) -> None:
    with pytest.raises(RiffusionError, match="height 100"):
        spectrogram_from_image(Image.new("RGB", (100, 100)))
    with pytest.raises(RiffusionError, match="too small"):
        spectrogram_from_image(Image.new("RGB", (5, 512)))
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(RiffusionError, match="not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(RiffusionError, match="silent"):
        pixels_from_spectrogram(np.zeros((1, 512, 10), np.float32), params)


def test_a_16_bit_gray_image_is_its_8_bit_twin(tmp_path, params: SpectrogramParams) -> None:
    """A 16-bit PNG (as image editors export) reads as its top 8 bits, in image-to-audio
    and as a seed image alike: one rule for both."""
    from riffusion_engine.engine.runtime.tensors import image_batch
    from riffusion_engine.kernels.image import pixels_from_image

    eight = np.random.default_rng(0).integers(0, 256, size=(512, 64), dtype=np.uint16)
    Image.fromarray((eight << 8 | 0x7F).astype(np.uint16)).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png")
    assert deep.mode.startswith("I")
    expected = np.repeat(eight.astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(pixels_from_image(deep), expected)
    gray = Image.fromarray(eight.astype(np.uint8), mode="L")
    np.testing.assert_array_equal(image_batch([deep]).numpy(), image_batch([gray]).numpy())
    mel, _ = spectrogram_from_image(deep, params)
    np.testing.assert_array_equal(mel, spectrogram_from_image(gray, params)[0])


def test_an_image_that_is_not_a_spectrogram_is_converted_with_a_warning(caplog, params) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(512, 64, 3), dtype=np.uint8)
    with caplog.at_level("WARNING"):
        spectrogram_from_image(Image.fromarray(rgb), params)
    assert "probably not a spectrogram" in caplog.text
    caplog.clear()
    mono = rgb.copy()
    mono[..., 1] = mono[..., 2] = mono[..., 0]  # Riffusion's mono layout, no EXIF
    stereo = rgb.copy()
    stereo[..., 0] = 0  # Riffusion's stereo layout, no EXIF
    with caplog.at_level("WARNING"):
        for pixels in (mono, stereo):
            spectrogram_from_image(Image.fromarray(pixels), params)
        spectrogram_from_image(image_from_audio(music_like(1.0), params.sample_rate, params), params)
    assert "probably not a spectrogram" not in caplog.text
    with pytest.raises(RiffusionError, match="image mode F is not supported"):
        spectrogram_from_image(Image.new("F", (64, 512)), params)
