"""Sizes a user can type are bounded before anything is allocated; the server warms up
before it says ready; a long recording is written as it is made; ONNX Runtime hands its
arena back between runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
from riffusion_engine import load
from riffusion_engine.kernels.errors import RiffusionError

CLI = [sys.executable, "-m", "riffusion_engine.engine.cli"]


def _spy(engine, monkeypatch) -> list[tuple[str, int, int]]:
    """Every backend call as (stage, batch rows, width of its image-sized input)."""
    calls: list[tuple[str, int, int]] = []
    run = engine.backend.run

    def spying(stage, inputs):
        first = next(iter(inputs.values()))
        calls.append((stage, int(first.shape[0]), int(first.shape[-1])))
        return run(stage, inputs)

    monkeypatch.setattr(engine.backend, "run", spying)
    return calls


def test_a_typed_width_is_bounded_on_the_torch_backend(torch_engine, monkeypatch) -> None:
    from riffusion_engine.engine.runtime.requests import PromptInput, Request

    calls = _spy(torch_engine, monkeypatch)
    with pytest.raises(RiffusionError) as caught:
        torch_engine.generate("a", steps=1, width=1_000_000)
    message = str(caught.value)
    assert "2048 pixels" in message and "--max-width 1000000 raises it" in message and "\n" not in message
    with pytest.raises(RiffusionError, match=r"narrowest clip this engine takes: 24 pixels"):
        torch_engine.generate("a", steps=1, width=16)
    from riffusion_engine import Stream

    with pytest.raises(RiffusionError, match="--max-width 1000000 raises it"):
        Stream.open(torch_engine, "a", width=1_000_000)  # before its seed image is made that wide
    assert calls == []  # refused before any stage ran
    # A width Griffin-Lim needs is the narrowest; it runs.
    clip = torch_engine.run([Request(PromptInput("a"), steps=1, width=24)])[0]
    assert clip.image.size == (24, 512)
    with pytest.raises(RiffusionError, match="at most 16"):
        torch_engine.run([Request(PromptInput("a"), steps=1, width=24)] * 17)


@pytest.mark.long
def test_max_width_raises_the_bound_and_is_refused_with_an_export(tiny_export) -> None:
    wide = load("random:tiny", backend="torch", max_width=4096)
    wide.check_width(4096)
    with pytest.raises(RiffusionError, match="4096 pixels"):
        wide.check_width(4104)
    with pytest.raises(RiffusionError, match="fixed when an export is made"):
        load(artifacts=tiny_export[0], backend="onnxruntime", max_width=4096)
    with pytest.raises(RiffusionError, match="multiple of 8"):
        load("random:tiny", backend="torch", max_width=1001)


def test_cli_refuses_a_typo_width_in_one_line(tmp_path: Path) -> None:
    for command in (
        ["generate", "a", "-o", str(tmp_path / "a.wav")],
        ["stream", "--start", "a", "--duration", "5", "-o", str(tmp_path / "b.wav")],
    ):
        argv = [*CLI, *command, "--model", "random:tiny", "--backend", "torch", "--steps", "1"]
        result = subprocess.run([*argv, "--width", "1000000"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "2048 pixels" in lines[0] and "--max-width" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_serve_refuses_a_batch_over_the_torch_bound() -> None:
    from conftest import run_cli

    code, _, err = run_cli("serve", "--model", "random:tiny", "--backend", "torch", "--max-batch", "17")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "--max-batch 17 is more than this model's engine takes in one call (16)" in err


@pytest.mark.long
def test_the_server_runs_every_shape_before_it_is_ready(torch_engine, monkeypatch) -> None:
    """After the warm-up, a batch of three requests (the web app's, at 512) and a 256 px
    stream's clip run no shape that the warm-up did not already run."""
    from collections import OrderedDict

    from fastapi.testclient import TestClient
    from riffusion_engine.engine.runtime.requests import PromptInput, Request
    from riffusion_engine.engine.runtime.seeds import seed_image
    from riffusion_engine.engine.serve.app import create_app
    from riffusion_engine.engine.serve.config import ServerConfig

    calls = _spy(torch_engine, monkeypatch)
    # A fresh server's prompt cache: another test's server may have warmed up this session's engine.
    monkeypatch.setattr(torch_engine, "_embeddings", OrderedDict())
    ready = []
    app = create_app(torch_engine, ServerConfig(max_batch=3), on_event=lambda *event: ready.append(event))
    with TestClient(app) as client:
        assert [name for name, _ in ready] == ["starting", "ready"] and ready[1][1].warm_up_s > 0
        warm = set(calls)
        assert client.get("/health").status_code == 200
    assert {width for stage, _, width in warm if stage == "vae_encoder"} == {512, 256}
    calls.clear()
    image = seed_image("og_beat")
    torch_engine.run(
        [Request(PromptInput(f"p{i}", seed=i), steps=3, width=512, seed_image=image) for i in range(3)]
    )
    torch_engine.run([Request(PromptInput("q"), steps=2, width=256, seed_image=image.crop((0, 0, 256, 512)))])
    assert calls and set(calls) <= warm, set(calls) - warm


def test_no_warm_up_skips_it(torch_engine, monkeypatch) -> None:
    from fastapi.testclient import TestClient
    from riffusion_engine.engine.serve.app import create_app
    from riffusion_engine.engine.serve.config import ServerConfig

    calls = _spy(torch_engine, monkeypatch)
    with TestClient(create_app(torch_engine, ServerConfig(warm_up=False))):
        pass
    assert calls == []


def test_the_cpu_runs_a_batch_a_clip_at_a_time_with_the_batch_result(torch_engine, monkeypatch) -> None:
    from riffusion_engine.engine.runtime.requests import PromptInput, Request
    from riffusion_engine.engine.runtime.seeds import seed_image

    image = seed_image("og_beat", width=64)
    requests = [
        Request(PromptInput(p, seed=i), steps=2, width=64, seed_image=image) for i, p in enumerate("abc")
    ]
    alone = [torch_engine.images([r]) for r in requests]  # the oracle: each request by itself
    calls = _spy(torch_engine, monkeypatch)
    together = torch_engine.images(requests)
    assert [n for stage, n, _ in calls if stage.startswith("vae")] == [1] * 6
    assert {n for stage, n, _ in calls if stage == "unet"} == {2}  # one clip's two guidance rows
    for i, single in enumerate(alone):
        np.testing.assert_allclose(together[i].numpy(), single[0].numpy(), atol=2e-5)


def test_audio_writer_keeps_what_was_written_on_ctrl_c(tmp_path: Path) -> None:
    from riffusion_engine.kernels.audio import audio_writer

    chunks = [np.full((2, 1000), k * 100, np.int16) for k in range(3)]
    out = tmp_path / "kept.wav"
    with pytest.raises(KeyboardInterrupt), audio_writer(out, 44100, 2) as write:
        for chunk in chunks[:2]:
            write(chunk)
        raise KeyboardInterrupt
    data, rate = soundfile.read(out, dtype="int16", always_2d=True)
    assert rate == 44100 and np.array_equal(data.T, np.concatenate(chunks[:2], axis=1))
    dropped = tmp_path / "dropped.flac"
    with pytest.raises(ValueError), audio_writer(dropped, 44100, 2) as write:
        write(chunks[0])
        raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.wav"]  # no file, no temporary left


@pytest.mark.long
def test_onnxruntime_hands_its_arena_back_between_runs(tiny_export) -> None:
    """After runs of several batch sizes, a server's engine holds about what it held
    before them, not the runs' peak (ONNX Runtime's arena would keep that for good)."""
    code = textwrap.dedent(
        f"""
        import json, resource, psutil
        from riffusion_engine import load
        from riffusion_engine.engine.runtime.requests import PromptInput, Request
        engine = load(artifacts={str(tiny_export[0])!r}, backend="onnxruntime")
        engine.backend.shrink_after_runs()  # as a server does
        engine.run([Request(PromptInput("a"), steps=1, width=256)])
        loaded = psutil.Process().memory_info().rss
        for batch in (1, 2, 3, 4):
            engine.run([Request(PromptInput("a", seed=i), steps=1, width=512) for i in range(batch)])
        after = psutil.Process().memory_info().rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps([loaded, after, peak]))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    loaded, after, peak = json.loads(result.stdout.strip().splitlines()[-1])
    assert peak - loaded > 500 * 2**20  # the batch of 4 needed that much more while it ran
    assert after - loaded < 0.25 * (peak - loaded), (loaded / 2**20, after / 2**20, peak / 2**20)


@pytest.mark.slow
def test_soak_reports_memory_latency_and_failures(tmp_path: Path) -> None:
    """benchmarks/soak.py against a real server: every batch size, streams stopped and
    dropped, no failure, and the report's figures consistent with its own timeline."""
    out = tmp_path / "soak.json"
    argv = [sys.executable, "benchmarks/soak.py", "--model", "random:tiny", "--backend", "torch"]
    argv += ["--max-batch", "2", "--minutes", "0.75", "--streams", "1", "--json", str(out)]
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["failures"] == [], report["failures"]
    assert all(report["one_shot"]["by_batch"][b] > 0 for b in ("1", "2"))
    assert report["streams"]["stopped"] >= 1 and report["streams"]["dropped"] >= 1
    timeline = [gib for _, gib in report["rss_timeline"]]
    assert report["rss_gib"]["peak"] == pytest.approx(max(timeline))
    assert report["startup_s"] > 0 and (tmp_path / "soak.png").stat().st_size > 0
