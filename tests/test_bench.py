"""`riffusion-engine bench` at the smallest size: it runs, and its JSON follows the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
pytest.importorskip("librosa")

from conftest import run_cli
from PIL import Image
from riffusion_engine.engine.tools.bench import STAGES, BenchConfig
from riffusion_engine.kernels import RiffusionError


@pytest.mark.long
def test_bench_on_the_tiny_model(tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        "bench", "--model", "random:tiny", "--steps", "1", "--runs", "2", "--warmup", "0",
        "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "out.json"),
        "--plot", str(tmp_path / "out.png"),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["schema"] == 2
    assert report["config"]["model"] == "random:tiny" and report["config"]["steps"] == 1
    assert {"cpu", "cores", "gpu", "python", "platform", "versions"} <= set(report["environment"])
    assert report["environment"]["versions"]["diffusers"]
    assert report["audio_seconds"] == pytest.approx(5.11, abs=0.01)
    assert report["peak_rss_bytes"] > 0
    assert report["peak_gpu_bytes"] is None and report["gpu_memory_source"] is None  # a CPU run
    assert list(report["results"]) == ["reference", "torch", "onnxruntime"]
    for name, entry in report["results"].items():
        assert set(entry["stages"]) == set(STAGES)
        for stage in entry["stages"].values():
            assert len(stage["runs"]) == 2 and 0 < stage["median_s"] <= stage["p90_s"] + 1e-12
        assert entry["real_time_factor"] > 0
        agreement = entry["agreement"]
        assert 0 <= agreement["spectral_convergence"] < 1
        if name == "reference":
            assert "speedup" not in entry
        else:
            assert set(entry["speedup"]) == set(STAGES)
    # The torch backend is diffusers' computation: the same image.
    assert report["results"]["torch"]["agreement"]["max_abs_gray_levels"] == 0
    assert report["results"]["onnxruntime"]["agreement"]["share_within_one_gray_level"] >= 0.99
    assert "unet_step" in stdout and "real-time factor" in stdout
    with Image.open(tmp_path / "out.png") as chart:
        assert chart.format == "PNG" and chart.width > 0


@pytest.mark.long
def test_bench_with_the_realtime_profile(tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        "bench", "--model", "random:tiny", "--profile", "realtime", "--backends", "torch",
        "--runs", "1", "--warmup", "0", "--default-steps", "2", "--cache-dir", str(tmp_path / "cache"),
        "--json", str(tmp_path / "out.json"),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["config"]["profile"] == "realtime" and report["config"]["steps"] == 4
    assert "cpu_features" in report["environment"]
    seeded = " @ og_beat 0.75"
    # The candidate row's twins: bench's default DeepCache schedules and 2 steps.
    twins = ["torch deep-cache 2:0", "torch deep-cache 3:0", "torch 2 steps"]
    rows = ["reference", "torch", "torch default", *twins]
    assert list(report["results"]) == rows + [row + seeded for row in rows]
    for suffix in ("", seeded):
        # The torch backend is diffusers' pipeline with the same LoRA fused, AutoencoderTiny and LCM.
        torch_row = report["results"]["torch" + suffix]
        assert torch_row["agreement"]["share_within_one_gray_level"] >= 0.99
        assert torch_row["speedup_vs_default"] > 0 and torch_row["real_time_factor"] > 0
        assert "speedup_vs_default" not in report["results"]["torch default" + suffix]
        assert "agreement_vs_uncached" not in torch_row
        for twin in twins:
            entry = report["results"][twin + suffix]
            assert entry["uncached_row"] == "torch" + suffix
            agreement = entry["agreement_vs_uncached"]
            assert 0 < agreement["rms_gray_levels"] and agreement["share_within_16_gray_levels"] > 0.9
        # DeepCache moves the clip less than 2 steps do (another sampling).
        cached = report["results"]["torch deep-cache 2:0" + suffix]["agreement_vs_uncached"]
        fewer = report["results"]["torch 2 steps" + suffix]["agreement_vs_uncached"]
        assert cached["rms_gray_levels"] < fewer["rms_gray_levels"]
    assert report["deep_cache_gates"] == {}  # no bf16 row on torch: no yardstick, no gate
    assert "vs default" in stdout and "cpu:" in stdout
    # The table's header: every row's name (some longer than 26 characters) stands apart.
    (header,) = [line for line in stdout.splitlines() if line.startswith("stage ")]
    assert all(f"  {name}" in header for name in report["results"]), header


def test_bench_config_errors() -> None:
    with pytest.raises(RiffusionError, match="backends must be among"):
        BenchConfig(backends=("jax",))
    with pytest.raises(RiffusionError, match="at least 1"):
        BenchConfig(runs=0)


def test_peak_memory_is_the_device_level_rise_over_the_baseline() -> None:
    """bench's GPU memory is the device's own count (NVML / cudaMemGetInfo), sampled while
    the work runs: a rise from any allocator counts, a level below the baseline does not."""
    import time

    from riffusion_engine.engine.tools.device_memory import PeakMemory

    level = [1000]
    meter = PeakMemory(lambda: level[0], interval_s=0.001).start()
    level[0] = 5000  # e.g. TensorRT's workspace, invisible to torch's allocator
    deadline = time.monotonic() + 10
    while meter.peak < 5000 and time.monotonic() < deadline:
        time.sleep(0.005)
    level[0] = 800  # freed, and below where it started
    assert meter.stop() == 4000
    with PeakMemory(lambda: level[0]) as flat:
        pass
    assert flat.stop() == 0


def test_the_deep_cache_gate_measures_each_schedule_against_bf16s_error() -> None:
    """A schedule passes where its error against its uncached row is at most twice bf16's
    against fp32, same backend and mode; a run without a bf16 row has no gate."""
    from riffusion_engine.engine.tools.recipes import deep_cache_gates, parse_schedules

    seeded = " @ og_beat 0.75"
    results = {
        "openvino bf16": {"agreement_vs_fp32": {"rms_gray_levels": 0.3}},
        "openvino bf16" + seeded: {"agreement_vs_fp32": {"rms_gray_levels": 0.2}},
        "openvino int8 deep-cache 2:0": {
            "uncached_row": "openvino int8",
            "agreement_vs_uncached": {"rms_gray_levels": 0.5},
        },
        "openvino int8 deep-cache 2:0" + seeded: {
            "uncached_row": "openvino int8" + seeded,
            "agreement_vs_uncached": {"rms_gray_levels": 0.5},
        },
        "torch deep-cache 2:0": {"uncached_row": "torch", "agreement_vs_uncached": {"rms_gray_levels": 0.1}},
    }
    mode_of = {name: seeded if name.endswith(seeded) else "" for name in results}
    gates = deep_cache_gates(results, mode_of)
    assert gates["openvino int8 deep-cache 2:0"]["ratio"] == pytest.approx(0.5 / 0.3)
    assert gates["openvino int8 deep-cache 2:0"]["holds"]
    assert gates["openvino int8 deep-cache 2:0" + seeded]["ratio"] == pytest.approx(2.5)
    assert not gates["openvino int8 deep-cache 2:0" + seeded]["holds"]
    assert "torch deep-cache 2:0" not in gates
    assert [str(s) for s in parse_schedules(("2:0", "0", "3"))] == ["2:0", "3:0"]
    with pytest.raises(RiffusionError, match="one branch per bench run"):
        parse_schedules(("2:0", "3:1"))
