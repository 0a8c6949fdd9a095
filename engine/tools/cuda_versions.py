"""The CUDA each GPU library was built for, and what the driver runs: one major throughout.

torch, CuPy, ONNX Runtime's CUDA build and TensorRT each load their own CUDA runtime
libraries (``libcudart.so.12`` or ``.so.13``, cuBLAS, cuDNN); in one process they must
share a major, and the driver must run that major (CUDA 12 needs a 525 driver or newer,
CUDA 13 a 580 one). ``doctor --device cuda`` reports these and fails on a mismatch.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
from dataclasses import dataclass

Version = tuple[int, int]  # CUDA (major, minor)

# Distributions that carry one CUDA major in their name.
_CUPY = {"cupy-cuda13x": 13, "cupy-cuda12x": 12, "cupy-cuda11x": 11}
_TENSORRT = {
    "tensorrt-cu13-libs": 13,
    "tensorrt-cu13": 13,
    "tensorrt-cu12-libs": 12,
    "tensorrt-cu12": 12,
}


@dataclass(frozen=True)
class CudaVersions:
    libraries: dict[str, Version | None]  # library -> the CUDA it was built for; None: absent or CPU build
    driver: str | None  # the driver's version, "580.65.06"
    driver_cuda: Version | None  # the newest CUDA that driver runs
    clashes: tuple[tuple[str, str], ...] = ()  # installed distributions that share one module

    def problems(self) -> list[str]:
        """What keeps these from running together, one line each (none: fine)."""
        built = {name: v for name, v in self.libraries.items() if v is not None}
        found = [
            f"{a} and {b} are both installed and share one module: pip uninstall -y {a} {b}, "
            f"then install the one for this machine"
            for a, b in self.clashes
        ]
        majors = sorted({v[0] for v in built.values()})
        if len(majors) > 1:
            found.append(
                f"the GPU libraries mix CUDA majors ({self.describe_libraries()}): install one set, "
                "'riffusion-engine[gpu]' for CUDA 13 or 'riffusion-engine[gpu-cu12]' for CUDA 12, "
                "with a torch of the same CUDA"
            )
        if self.driver_cuda is not None:
            newer = {name: v for name, v in built.items() if v[0] > self.driver_cuda[0]}
            if newer:
                need = "580" if max(v[0] for v in newer.values()) >= 13 else "525"
                libraries = ", ".join(f"{n} {_text(v)}" for n, v in newer.items())
                found.append(
                    f"the driver ({self.driver or 'unknown version'}) runs CUDA up to "
                    f"{_text(self.driver_cuda)}, older than {libraries} needs: a {need} driver "
                    "or newer, or the gpu-cu12 extra and a CUDA 12 torch"
                )
        return found

    def describe_libraries(self) -> str:
        return ", ".join(f"{name} {_text(v) if v else '-'}" for name, v in self.libraries.items())

    def describe(self) -> str:
        driver = f"driver {self.driver or '?'} (CUDA {_text(self.driver_cuda) if self.driver_cuda else '?'})"
        return f"{driver}; built for CUDA: {self.describe_libraries()}"


def _text(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def parse(version: str | int | None) -> Version | None:
    """ "13.0", "12.8.1" or CUDA's integer form (13000, 12080) -> (major, minor)."""
    if version is None or version == "":
        return None
    if isinstance(version, int):  # 0: no driver (cudaDriverGetVersion's answer then)
        return (version // 1000, (version % 1000) // 10) if version >= 1000 else None
    major, minor = [*str(version).split("."), "0"][:2]
    try:
        return int(major), int(minor)
    except ValueError:
        return None


def _installed(name: str) -> bool:
    """Whether the distribution ``name`` is installed."""
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _major_of_installed(names: dict[str, int]) -> Version | None:
    """The CUDA major in the name of the first of ``names`` installed."""
    return next(((major, 0) for name, major in names.items() if _installed(name)), None)


def torch_cuda() -> Version | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return parse(torch.version.cuda)


def cupy_cuda() -> Version | None:
    """The CUDA runtime CuPy loads, or the major its distribution is built for."""
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        return parse(int(cupy.cuda.runtime.runtimeGetVersion()))
    except Exception:  # no CUDA runtime library loadable here: the wheel's name says the major
        return _major_of_installed(_CUPY)


def onnxruntime_cuda() -> Version | None:
    """The CUDA an onnxruntime-gpu build was made for (None for a CPU build): its
    ``capi/build_and_package_info.py`` (``cuda_version``); where a build lacks it (PyPI's
    1.19.0 does), PyPI's builds by version (1.19-1.26 CUDA 12, earlier 11.8)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return None
    try:
        from onnxruntime.capi import build_and_package_info

        built = parse(getattr(build_and_package_info, "cuda_version", None))
    except ImportError:
        built = None
    if built is not None:
        return built
    release = parse(onnxruntime.__version__.split("+")[0])
    return None if release is None else (12, 0) if release >= (1, 19) else (11, 8)


# Distributions that install the same module: with both, one overwrote the other's files.
SAME_MODULE = (
    ("onnxruntime", "onnxruntime-gpu"),
    ("cupy-cuda12x", "cupy-cuda13x"),
    ("tensorrt-cu12", "tensorrt-cu13"),
)


def same_module_pairs() -> list[tuple[str, str]]:
    """The installed pairs of SAME_MODULE."""
    return [pair for pair in SAME_MODULE if all(_installed(n) for n in pair)]


def tensorrt_cuda() -> Version | None:
    """The CUDA major of pip's TensorRT (tensorrt-cu12 / tensorrt-cu13)."""
    return _major_of_installed(_TENSORRT) if importlib.util.find_spec("tensorrt") is not None else None


def driver() -> tuple[str | None, Version | None]:
    """The driver's version and the newest CUDA it runs: NVML (nvidia-ml-py), else the CUDA
    driver API through CuPy; (None, None) where neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        version = version.decode() if isinstance(version, bytes) else str(version)
        return version, parse(int(pynvml.nvmlSystemGetCudaDriverVersion()))
    except Exception:
        pass
    try:
        import cupy

        return None, parse(int(cupy.cuda.runtime.driverGetVersion()))
    except Exception:
        return None, None


def cuda_versions() -> CudaVersions:
    libraries = {
        "torch": torch_cuda(),
        "cupy": cupy_cuda(),
        "onnxruntime": onnxruntime_cuda(),
        "tensorrt": tensorrt_cuda(),
    }
    version, runs = driver()
    return CudaVersions(libraries, version, runs, tuple(same_module_pairs()))
