"""Model sources: random presets, saving and loading a diffusers-format directory, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from riffusion_engine.export.models import VAE_SCALING, load_components  # noqa: E402
from riffusion_engine.kernels import RiffusionError  # noqa: E402


def test_tiny_preset_is_seeded_and_riffusion_shaped(tiny) -> None:
    again = load_components("random:tiny")
    assert again.content_hash == tiny.content_hash
    # The preset's hash describes it rather than hashing its weights: that is sound
    # only because the same seed draws the same weights.
    for name in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_components("random:tiny", seed=1).content_hash != tiny.content_hash
    assert tiny.vae.config.scaling_factor == VAE_SCALING
    assert tiny.vae.config.latent_channels == 4
    assert type(tiny.scheduler).__name__ == "PNDMScheduler"
    ids = tiny.tokenizer("a funky beat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids[0, 0]) == tiny.tokenizer.bos_token_id
    with torch.no_grad():
        latents = torch.randn(1, 4, 8, 8)
        assert tiny.vae.decode(latents).sample.shape == (1, 3, 64, 64)  # 8x, as Riffusion's VAE
        hidden = tiny.text_encoder(ids)[0]
        out = tiny.unet(torch.cat([latents] * 2), 10, encoder_hidden_states=torch.cat([hidden] * 2)).sample
    assert out.shape == (2, 4, 8, 8)


def test_saved_preset_loads_through_the_directory_path(tiny, tmp_path: Path) -> None:
    tiny.save(tmp_path / "model")
    loaded = load_components(str(tmp_path / "model"))
    assert loaded.model_id == str(tmp_path / "model")
    for name in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.tokenizer("a funky beat").input_ids == tiny.tokenizer("a funky beat").input_ids
    assert loaded.scheduler.config.steps_offset == 1
    assert load_components(str(tmp_path / "model")).content_hash == loaded.content_hash


def test_directory_hash_follows_the_files(tiny, tmp_path: Path) -> None:
    """The export cache trusts this hash: any change to a config or a weight file, or a
    file moved, must change it; restoring the files restores it."""
    from riffusion_engine.export.models import source_hash

    model = tmp_path / "model"
    tiny.save(model)
    original = source_hash(str(model))
    config = model / "unet" / "config.json"
    (weights,) = (model / "unet").glob("*.safetensors")
    saved_config, saved_weights = config.read_bytes(), weights.read_bytes()

    config.write_bytes(saved_config.replace(b'"norm_eps": 1e-05', b'"norm_eps": 1e-06'))
    assert config.read_bytes() != saved_config
    assert source_hash(str(model)) != original
    config.write_bytes(saved_config)
    assert source_hash(str(model)) == original

    flipped = bytearray(saved_weights)
    flipped[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(flipped))
    assert source_hash(str(model)) != original
    weights.write_bytes(saved_weights)

    # The same bytes under another name (a component's weights moved) are another model.
    weights.rename(weights.with_name("renamed.safetensors"))
    assert source_hash(str(model)) != original
    weights.with_name("renamed.safetensors").rename(weights)
    assert source_hash(str(model)) == original


def hub_like_repository(tiny, path: Path) -> Path:
    """A directory laid out like riffusion/riffusion-model-v1 on the hub: .bin weights in
    some component folders, safetensors (and .bin beside them) in others, a weight
    variant, and the files the engine must never take: the single-file checkpoints, the
    traced UNet, the safety checker and the feature extractor."""
    tiny.save(path)  # safetensors everywhere, model_index.json
    for name, weights in (("text_encoder", "pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin")):
        for other in (path / name).glob("*.safetensors"):  # these folders carry .bin only
            other.unlink()
        torch.save(getattr(tiny, name).state_dict(), path / name / weights)
    tiny.unet.save_pretrained(path / "unet-bin", safe_serialization=False)  # the unet has both
    (bin_file,) = (path / "unet-bin").glob("*.bin")
    bin_file.rename(path / "unet" / bin_file.name)
    shutil.rmtree(path / "unet-bin")
    (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    for name, data in {
        "riffusion-model-v1.ckpt": b"single-file checkpoint",
        "riffusion-model-v1.safetensors": b"single-file checkpoint",
        "unet_traced.pt": b"traced unet",
        "safety_checker/config.json": b"{}",
        "safety_checker/pytorch_model.bin": b"checker",
        "feature_extractor/preprocessor_config.json": b"{}",
        "README.md": b"# riffusion",
    }.items():
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_the_real_checkpoint_layout_takes_exactly_the_needed_files(tiny, tmp_path: Path, capsys) -> None:
    from riffusion_engine.export.models import _repository_files, select_files

    repo = hub_like_repository(tiny, tmp_path / "repo")
    files = _repository_files(repo)
    chosen = set(select_files(files))
    assert "model_index.json" in chosen
    expected_weights = {
        "text_encoder/pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
    }
    assert {f for f in chosen if f.endswith((".bin", ".safetensors"))} == expected_weights
    never = (
        "ckpt",
        "riffusion-model-v1.safetensors",
        ".pt",
        "safety_checker/",
        "feature_extractor/",
        ".fp16.",
    )
    assert not [f for f in chosen if any(n in f for n in never)]
    for component in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        configs = {f for f in files if f.startswith(f"{component}/") and f.endswith((".json", ".txt"))}
        assert configs and configs <= chosen
    # Only the chosen files, copied out, load; they are the model's weights.
    only = tmp_path / "only"
    for name in chosen:
        (only / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, only / name)
    for source in (only, repo):
        capsys.readouterr()
        loaded = load_components(str(source))
        assert "Loading weights" not in capsys.readouterr().err  # transformers' bar, beside ours
        for name in ("text_encoder", "unet", "vae"):
            ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The content hash covers what is loaded, not the 4 GB checkpoint beside it.
    assert load_components(str(only)).content_hash == load_components(str(repo)).content_hash
    (repo / "riffusion-model-v1.ckpt").write_bytes(b"another checkpoint")
    assert load_components(str(repo)).content_hash == load_components(str(only)).content_hash


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_single_file_checkpoint_loads_weight_for_weight(tiny, tmp_path: Path, suffix: str) -> None:
    """The original Stable Diffusion layout (riffusion-model-v1.ckpt), written from the
    tiny model, read through diffusers' single-file loading with the configuration in the
    checkpoint's folder (the hub repository's layout): the same weights come back."""
    from ldm_checkpoint import ldm_state_dict
    from riffusion_engine.export.models import source_hash

    repo = hub_like_repository(tiny, tmp_path / "repo")
    checkpoint = repo / f"riffusion-model-v1{suffix}"
    state = ldm_state_dict(tiny)
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, checkpoint)
    else:
        from safetensors.torch import save_file

        save_file(state, str(checkpoint))
    # The component folders' weights are not what is read: break them to be sure.
    for weights in (repo / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    loaded = load_components(str(checkpoint))
    for name in ("text_encoder", "unet", "vae"):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.tokenizer("a funky beat").input_ids == tiny.tokenizer("a funky beat").input_ids
    assert type(loaded.scheduler).__name__ == "PNDMScheduler" and loaded.scheduler.config.steps_offset == 1
    assert loaded.vae.config.scaling_factor == VAE_SCALING
    # The hash follows the checkpoint's bytes and its configuration, not the folder's other weights.
    before = source_hash(str(checkpoint))
    assert loaded.content_hash == before
    other = "riffusion-model-v1.ckpt" if suffix == ".safetensors" else "unet_traced.pt"
    (repo / other).write_bytes(b"x")
    assert source_hash(str(checkpoint)) == before
    config = repo / "unet" / "config.json"
    config.write_text(config.read_text().replace('"norm_eps": 1e-05', '"norm_eps": 1e-06'))
    assert source_hash(str(checkpoint)) != before


def test_a_checkpoint_without_configuration_offline_is_one_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "model.ckpt").write_bytes(b"weights")
    with pytest.raises(RiffusionError, match=r"needs a model configuration.*model_index\.json.*hf download"):
        load_components(str(tmp_path / "model.ckpt"))


def test_a_broken_checkpoint_is_one_clear_error(tiny, tmp_path: Path) -> None:
    model = tiny.save(tmp_path / "model")
    (model / "model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RiffusionError, match=r"cannot load checkpoint .*model\.ckpt"):
        load_components(str(model / "model.ckpt"))


def test_a_component_without_weights_is_one_clear_error(tiny, tmp_path: Path) -> None:
    model = tiny.save(tmp_path / "model")
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(RiffusionError, match=r"unet/ holds no weights \(.safetensors or .bin\)"):
        load_components(str(model))


def test_bad_model_sources(tmp_path: Path) -> None:
    with pytest.raises(RiffusionError, match="unknown preset"):
        load_components("random:huge")
    with pytest.raises(RiffusionError, match="not a diffusers-format directory, a single-file checkpoint"):
        load_components(str(tmp_path / "missing"))
    (tmp_path / "weights.pt").write_bytes(b"traced")
    with pytest.raises(RiffusionError, match=r"\(\.ckpt or \.safetensors\)"):
        load_components(str(tmp_path / "weights.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RiffusionError, match=r"lacks model_index\.json"):
        load_components(str(tmp_path / "empty"))


def test_offline_hub_id_without_cache_is_one_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RiffusionError, match="not in the local cache"):
        load_components("nobody/no-such-model")


@pytest.mark.slow
def test_full_preset_has_riffusion_v1_architecture() -> None:
    full = load_components("random:full")
    assert tuple(full.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert full.unet.config.cross_attention_dim == 768
    assert full.text_encoder.config.hidden_size == 768 and full.text_encoder.config.num_hidden_layers == 12
    assert sum(p.numel() for p in full.unet.parameters()) == pytest.approx(859.5e6, rel=0.01)
