"""The GPU set-up, checked where no GPU is: one CUDA major across the extras and the
libraries, GPU checks that fail rather than pass having run nothing, and ONNX Runtime's
TensorRT provider given an export it can parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import run_cli
from riffusion_engine.engine.tools.cuda_versions import CudaVersions, cuda_versions, parse
from riffusion_engine.kernels import RiffusionError

ROOT = Path(__file__).resolve().parents[1]


def _no_gpu() -> None:
    from conftest import _cuda_device

    if _cuda_device() is None:
        pytest.skip("a CUDA device is usable here")


# -- checks that cannot pass on nothing ------------------------------------------------


@pytest.mark.long
def test_pytest_m_gpu_without_a_gpu_fails_in_one_line() -> None:
    _no_gpu()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*command, "tests/test_gpu_kernels.py"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1, run.stdout + run.stderr
    (line,) = [x for x in (run.stdout + run.stderr).splitlines() if "gpu test(s) selected" in x]
    assert "no CUDA GPU" in line and "--allow-no-gpu" in line
    allowed = subprocess.run(
        [*command, "--allow-no-gpu", "tests/test_gpu_kernels.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert allowed.returncode == 0 and " skipped" in allowed.stdout, allowed.stdout + allowed.stderr


def test_doctor_on_cuda_without_a_gpu_fails_in_one_line() -> None:
    pytest.importorskip("torch")
    _no_gpu()
    code, stdout, err = run_cli("doctor", "--device", "cuda")
    assert code != 0
    assert stdout == ""  # before any row
    (line,) = err.strip().splitlines()
    assert "doctor --device cuda cannot check the GPU here" in line and "no CUDA GPU" in line


# -- one CUDA major ------------------------------------------------------------------------


def test_cuda_versions_parse_both_forms() -> None:
    assert parse("13.0") == (13, 0) and parse("12.8.1") == (12, 8)
    assert parse(13000) == (13, 0) and parse(12080) == (12, 8) and parse(None) is None


def test_one_major_and_a_driver_that_runs_it_pass() -> None:
    versions = CudaVersions(
        {"torch": (13, 0), "cupy": (13, 0), "onnxruntime": (13, 0), "tensorrt": None}, "580.65.06", (13, 0)
    )
    assert versions.problems() == []
    assert "torch 13.0" in versions.describe() and "tensorrt -" in versions.describe()


def test_mixed_majors_fail_naming_each_library() -> None:
    libraries = {"torch": (13, 0), "cupy": (12, 8), "onnxruntime": None, "tensorrt": None}
    versions = CudaVersions(libraries, None, None)
    (problem,) = versions.problems()
    assert "mix CUDA majors" in problem and "torch 13.0" in problem and "cupy 12.8" in problem


def test_a_driver_older_than_the_libraries_fails() -> None:
    versions = CudaVersions(
        {"torch": (13, 0), "cupy": (13, 0), "onnxruntime": None, "tensorrt": None}, "570.86.10", (12, 8)
    )
    (problem,) = versions.problems()
    assert "570.86.10" in problem and "12.8" in problem and "580" in problem


def test_two_packages_of_one_module_fail() -> None:
    libraries = {"torch": None, "cupy": None, "onnxruntime": None, "tensorrt": None}
    versions = CudaVersions(libraries, None, None, (("onnxruntime", "onnxruntime-gpu"),))
    (problem,) = versions.problems()
    assert "onnxruntime and onnxruntime-gpu are both installed" in problem


def test_cuda_versions_here() -> None:
    """A CPU build of torch and the CPU onnxruntime were built for no CUDA."""
    torch = pytest.importorskip("torch")
    versions = cuda_versions()
    assert versions.libraries["torch"] == parse(torch.version.cuda)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert versions.libraries["onnxruntime"] is None


# -- ONNX Runtime's TensorRT provider ------------------------------------------------------------


def test_first_use_export_for_the_tensorrt_provider_is_unfused() -> None:
    pytest.importorskip("torch")
    from riffusion_engine.engine.runtime.loading import first_use_export

    common = {"device": "cuda", "precision": "fp32", "seed": 0}
    trt_name, trt = first_use_export("random:tiny", backend="onnxruntime", provider="tensorrt", **common)
    cuda_name, cuda = first_use_export("random:tiny", backend="onnxruntime", provider="cuda", **common)
    assert not trt.fuse and "unfused" in trt_name
    assert cuda.fuse and cuda_name != trt_name
    # The widths the engines are built for: the native TensorRT backend's, not ONNX files' 2048.
    _, native = first_use_export("random:tiny", backend="tensorrt", provider=None, **common)
    assert trt.profile == native.profile and trt.profile.max_width is None  # None: the width, 512
    assert cuda.profile.max_width == 2048


def test_tensorrt_provider_refuses_a_fused_export(tiny_export) -> None:
    from riffusion_engine.engine.runtime.tensorrt_runtime import check_export_for_provider
    from riffusion_engine.export.manifest import Manifest

    manifest = Manifest.load(tiny_export[0])
    with pytest.raises(RiffusionError, match=r"TensorRT cannot parse.*--no-fuse"):
        check_export_for_provider(manifest, "tensorrt")
    check_export_for_provider(manifest, "cuda")  # ONNX Runtime's own kernels run them


def test_tensorrt_provider_without_tensorrt_names_the_extra() -> None:
    import importlib.util

    from riffusion_engine.engine.runtime.tensorrt_runtime import load_tensorrt_libraries

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(RiffusionError, match=r"libnvinfer.*riffusion-engine\[tensorrt\]"):
        load_tensorrt_libraries()


def pyproject_extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


# CUDA majors of the GPU distributions, as their wheels' metadata declare them:
# cupy-cudaNNx and tensorrt-cuNN by name; onnxruntime-gpu by release (1.19-1.26 link
# libcudart.so.12 and require nvidia-*-cu12 in their [cuda] extra; 1.27 on require CUDA 13
# runtimes and record cuda_version 13.0; earlier ones are CUDA 11.8).
ORT_GPU_RELEASES = {"1.18.1": 11, "1.19.0": 12, "1.20.1": 12, "1.21.0": 12, "1.26.0": 12, "1.27.0": 13}
ORT_GPU_RELEASES |= {"1.28.0": 13, "1.31.1": 13}


def cuda_majors(requirement: str) -> set[int]:
    """The CUDA majors a requirement admits; empty for a package without CUDA."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    name = req.name.lower().replace("_", "-")
    if name.startswith("cupy-cuda"):
        return {int(name.removeprefix("cupy-cuda").removesuffix("x"))}
    if name.startswith("tensorrt-cu"):
        return {int(name.removeprefix("tensorrt-cu").split("-")[0])}
    if name == "onnxruntime-gpu":
        return {major for release, major in ORT_GPU_RELEASES.items() if req.specifier.contains(release)}
    assert name in ("nvidia-ml-py", "polygraphy") or not name.startswith(("tensorrt", "cuda", "nvidia")), (
        f"{requirement}: a GPU package of unknown CUDA major (the bare tensorrt meta-package "
        "follows NVIDIA's newest CUDA)"
    )
    return set()


@pytest.mark.parametrize(
    ("extras", "major"), [(("gpu", "tensorrt"), 13), (("gpu-cu12", "tensorrt-cu12"), 12)]
)
def test_each_gpu_extra_pins_one_cuda_major(extras: tuple[str, ...], major: int) -> None:
    pytest.importorskip("packaging")
    extra = pyproject_extras()
    for name in extras:
        found = {m for requirement in extra[name] for m in cuda_majors(requirement)}
        assert found == {major}, (name, extra[name])


def test_the_test_extras_cupy_is_the_gpu_extras() -> None:
    pytest.importorskip("packaging")
    extra = pyproject_extras()
    cupy = [r for r in extra["test"] if r.startswith("cupy")]
    assert cupy and {m for r in cupy for m in cuda_majors(r)} == {
        m for r in extra["gpu"] for m in cuda_majors(r)
    }


def test_no_extra_mixes_cuda_majors() -> None:
    pytest.importorskip("packaging")
    for name, requirements in pyproject_extras().items():
        majors = {m for r in requirements for m in cuda_majors(r)}
        assert len(majors) <= 1, (name, requirements)
    assert not any("cuda-python" in r for rs in pyproject_extras().values() for r in rs)
