"""The built-in seed images and masks, and a directory of them: each seed image is the
spectrogram of its audio, each mask a grayscale strength map."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from riffusion_engine.engine.runtime.seeds import MASKS, SEED_AUDIO, SeedLibrary, mask_image, seed_image
from riffusion_engine.kernels import RiffusionError
from riffusion_engine.kernels.params import SpectrogramParams


@pytest.mark.parametrize("seed_id", list(SEED_AUDIO))
def test_seed_images_are_spectrograms_of_their_audio(seed_id: str) -> None:
    """Each seed image is its audio in Riffusion's image format, as the original's rules
    (mel, power 0.25, inversion, flip) re-implemented with librosa draw it."""
    from riffusion_engine.engine.tools.reference import original_image_pixels

    params = SpectrogramParams()
    image = seed_image(seed_id)
    assert (image.size, image.mode) == ((512, 512), "RGB")
    audio = SEED_AUDIO[seed_id](5.11, params.sample_rate)
    expected = original_image_pixels(audio, params)
    diff = np.abs(np.asarray(image, dtype=int) - expected.astype(int))
    assert (diff <= 1).mean() >= 0.99
    assert np.asarray(image).std() > 10  # not blank


@pytest.mark.parametrize(("mask_id", "value"), [("mask_top_third_75", 0.75), ("mask_top_third_95", 0.95)])
def test_top_third_masks_regenerate_the_top_third_only(mask_id: str, value: float) -> None:
    pixels = np.asarray(mask_image(mask_id))
    assert (pixels[:170] == round(255 * value)).all()
    assert (pixels[171:] == 0).all()


def test_every_mask_is_a_grayscale_strength_map() -> None:
    for mask_id in MASKS:
        image = mask_image(mask_id)
        assert (image.size, image.mode) == ((512, 512), "L")
        pixels = np.asarray(image)
        assert pixels.max() > 0 and pixels.min() < 255


def test_a_directory_adds_and_overrides_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (512, 512), (10, 20, 30)).save(tmp_path / "og_beat.png")
    Image.new("L", (512, 512), 200).save(tmp_path / "my_mask.png")
    (tmp_path / "bad name.png").write_bytes(b"not a png")  # not an id: not read, and said
    (tmp_path / "bad id!.png").write_bytes(b"not a png")
    with caplog.at_level("WARNING"):
        library = SeedLibrary(tmp_path)
    (skipped,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "'bad id!.png', 'bad name.png'" in skipped and "og_beat" not in skipped
    assert "my_mask" in library and "og_beat" in library and "bad name" not in library
    assert np.asarray(library.get("og_beat"))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(library.get("my_mask"))[0, 0] == 200
    # A file no clip can start from is refused at start-up, naming it.
    for name, make, message in (
        ("broken", lambda p: p.write_bytes(b"not a png"), "not a readable PNG"),
        ("short", lambda p: Image.new("RGB", (512, 256)).save(p), "256 pixels tall, not 512"),
        ("odd", lambda p: Image.new("RGB", (801, 512)).save(p), "audio-to-image --width 800"),
    ):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        make(bad / f"{name}.png")
        with pytest.raises(RiffusionError, match=message):
            SeedLibrary(bad)
        (bad / f"{name}.png").unlink()
    with pytest.raises(RiffusionError, match="unknown id"):
        library.get("../og_beat")
    with pytest.raises(RiffusionError, match="does not exist"):
        SeedLibrary(tmp_path / "missing")
    assert os.path.exists(tmp_path / "og_beat.png")
