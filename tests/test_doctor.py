"""`riffusion-engine doctor`: every CPU path runs and agrees with the reference, every GPU
path says why it cannot run here, and a failing path fails the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import run_cli
from riffusion_engine.engine.tools.doctor import Doctor, Skip
from riffusion_engine.kernels import RiffusionError

GPU_WORDS = ("cuda", "cupy", "tensorrt", "DLPack")


@pytest.mark.long
def test_doctor_on_the_cpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: doctor --device cuda is the check (pytest -m gpu)")
    out = tmp_path / "doctor.json"
    code, stdout, err = run_cli("doctor", "--device", "cpu", "--steps", "2", "--json", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["schema"] == 1 and report["device"] == "cpu"
    checks = {c["path"]: c for c in report["checks"]}
    gpu = [p for p in checks if any(word in p for word in GPU_WORDS)]
    cpu = [p for p in checks if p not in gpu]
    assert len(gpu) >= 12 and len(cpu) >= 10
    for path in cpu:
        check = checks[path]
        assert check["status"] == "ok", check
        if check["error"] is not None:
            assert 0 <= check["error"] <= check["tolerance"], check
    for path in gpu:
        assert checks[path]["status"] == "skipped" and checks[path]["detail"], checks[path]
        # What each GPU row asked for (test_doctor_on_cuda requires a row whose needs are met to pass).
        assert "cuda" in checks[path]["needs"], checks[path]
    # The backends really were compared with the reference, not with themselves.
    assert checks["onnxruntime cpu fp32"]["error"] > 0
    assert checks["onnxruntime cpu fp16"]["error"] > checks["onnxruntime cpu fp32"]["error"]
    assert "picked onnxruntime" in checks["auto cpu: export on first use"]["detail"]
    assert f"{len(cpu)} ok, 0 failed, {len(gpu)} skipped" in stdout
    for path in checks:
        assert path in stdout


def test_gpu_paths_say_what_is_missing(tmp_path: Path) -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    doctor = Doctor("cuda", tmp_path)
    with pytest.raises(Skip, match=r"no CUDA GPU \(torch .* sees none\)") as skip:
        doctor.require("cuda", "tensorrt")
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt not installed (pip install 'riffusion-engine[tensorrt]')" in str(skip.value)
    doctor.require()  # a CPU path needs nothing


def test_a_check_passes_fails_or_skips(tmp_path: Path) -> None:
    doctor = Doctor("cpu", tmp_path)

    def crash():
        raise RiffusionError("engine exploded\nwith a traceback")

    def skip():
        raise Skip("not here")

    results = [
        doctor.run("fine", lambda: (0.5, 1.0, "compared")),
        doctor.run("too far", lambda: (2.0, 1.0, "compared")),
        doctor.run("crashes", crash),
        doctor.run("skips", skip),
        doctor.run("no error to compare", lambda: (None, None, "ran")),
    ]
    assert [r.status for r in results] == ["ok", "failed", "failed", "skipped", "ok"]
    assert results[1].detail.startswith("error above tolerance")
    assert results[2].detail == "RiffusionError: engine exploded"
    assert results[3].detail == "not here"


def test_a_failed_path_fails_the_command(monkeypatch, tmp_path: Path) -> None:
    from riffusion_engine.engine.tools import doctor as doctor_module

    def only_two(self):
        yield "fine", lambda: (0.0, 1.0, "compared")
        yield "broken", lambda: (1.0, 0.0, "compared")

    monkeypatch.setattr(doctor_module.Doctor, "all_checks", only_two)
    code, stdout, err = run_cli("doctor", "--device", "cpu", "--json", str(tmp_path / "d.json"))
    assert code == 2 and "1 path(s) failed: broken" in err
    assert "1 ok, 1 failed, 0 skipped" in stdout
    assert [c["status"] for c in json.loads((tmp_path / "d.json").read_text())["checks"]] == ["ok", "failed"]


@pytest.mark.long  # the server row: three realtime requests at once on the CPU
def test_the_realtime_rows_need_cuda_and_their_logic_runs_on_the_cpu(tmp_path: Path) -> None:
    """doctor --device cuda has realtime-profile rows, skipped here naming what they need;
    the server row's code runs here on the CPU (torch fp32): three requests at once, each
    answered with its own clip."""
    import types

    import torch
    from riffusion_engine.engine.tools.doctor_realtime import RealtimeRows

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    doctor = Doctor("cuda", tmp_path)
    rows = [(path, check) for path, check in doctor.all_checks() if path.startswith("realtime:")]
    assert len(rows) >= 6
    for path, check in rows:
        result = doctor.run(path, check)
        assert result.status == "skipped" and "no CUDA GPU" in result.detail and "cuda" in result.needs
    here = types.SimpleNamespace(require=lambda *needs: None, work=tmp_path, steps=2)
    realtime = RealtimeRows(here, tolerance=0.1, device="cpu")
    error, tolerance, detail = realtime.server()
    assert error <= tolerance and "3 requests at once" in detail
