"""The engine's own handling of a TensorRT execution context, without a GPU.

A small stand-in for ``IExecutionContext`` (TensorRT 10's name-based API: shapes and
addresses set per tensor, ``False`` returned on failure) computes a row-wise function
straight from the bound memory, so padding, slicing and address handling are checked
for real; the return-value checks are checked by making the stand-in refuse.
This tests our control flow, not TensorRT (that is ``pytest -m gpu``).
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from riffusion_engine.export.specs import ModelDims, ShapeProfile, StageSpec, stage_specs  # noqa: E402
from riffusion_engine.export.tensorrt_build import check_tensorrt_version  # noqa: E402
from riffusion_engine.export.tensorrt_engine import (  # noqa: E402
    InlineStreams,
    StageEngine,
)
from riffusion_engine.kernels import RiffusionError  # noqa: E402

DIMS = ModelDims(tokens=77, vocab=1000, text_hidden=32, latent_channels=4, vae_factor=8, unet_factor=2)


def unet_spec(**profile) -> StageSpec:
    return stage_specs(DIMS, ShapeProfile(height=64, width=64, **profile))["unet"]


def view(ptr: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """The memory at ``ptr`` as an array (what an engine reads and writes)."""
    count = int(np.prod(shape))
    ctype = {np.float32: ctypes.c_float, np.int32: ctypes.c_int32}[dtype]
    return np.ctypeslib.as_array((ctype * count).from_address(ptr)).reshape(shape)


def expected_rows(sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """What the stand-in engine computes, row by row."""
    return sample * 2 + timestep[:, None, None, None] + hidden.mean(axis=(1, 2))[:, None, None, None]


class StandInContext:
    """IExecutionContext's name-based API over host memory (TensorRT 10 semantics)."""

    def __init__(self, spec: StageSpec, *, refuse: str | None = None) -> None:
        self.profile = {t.name: (t.size("min"), t.size("max")) for t in spec.inputs}
        self.output = spec.outputs[0].name
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.refuse = refuse
        self.launches = 0
        self.shape_calls = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape_calls += 1
        if self.refuse == "shape" or name not in self.profile:
            return False
        low, high = self.profile[name]
        if len(shape) != len(low) or any(
            not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
        ):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if self.refuse == "address":
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        if (
            self.refuse == "execute"
            or set(self.shapes) != set(self.profile)
            or self.output not in self.addresses
        ):
            return False
        self.launches += 1
        sample = view(self.addresses["sample"], self.shapes["sample"])
        timestep = view(self.addresses["timestep"], self.shapes["timestep"])
        hidden = view(self.addresses["encoder_hidden_states"], self.shapes["encoder_hidden_states"])
        view(self.addresses[self.output], self.shapes["sample"])[:] = expected_rows(sample, timestep, hidden)
        return True


def unet_inputs(rows: int, seed: int = 0, width: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(rows, 4, 8, width, generator=g),
        "timestep": torch.rand(rows, generator=g) * 999,
        "encoder_hidden_states": torch.randn(rows, 77, 32, generator=g),
    }


def run(engine: StageEngine, inputs: dict) -> np.ndarray:
    (out,) = engine.run(inputs, [tuple(inputs["sample"].shape)], torch.device("cpu"))
    return out.numpy()


def oracle(inputs: dict) -> np.ndarray:
    return expected_rows(*(inputs[k].numpy() for k in ("sample", "timestep", "encoder_hidden_states")))


@pytest.mark.parametrize("static", [False, True])
def test_one_two_and_three_requests_give_their_own_rows(static: bool) -> None:
    spec = unet_spec(max_batch=4, static=static)
    context = StandInContext(spec)
    engine = StageEngine("unet", context, spec, static=static, streams=InlineStreams())
    # 2 x requests rows with guidance; in a static export they are padded to 8 rows.
    for seed, rows in enumerate((2, 4, 6, 2)):
        inputs = unet_inputs(rows, seed)
        got = run(engine, inputs)
        assert got.shape == (rows, 4, 8, 8)
        np.testing.assert_allclose(got, oracle(inputs), rtol=1e-6)
    if static:
        assert context.shapes["sample"] == (8, 4, 8, 8)  # bound once, at the static shape
        assert context.shape_calls == 3  # bound once (the three inputs), then only copies and launches
    assert context.launches == 4


def test_a_static_export_refuses_what_it_cannot_pad() -> None:
    spec = unet_spec(max_batch=2, static=True)
    engine = StageEngine("unet", StandInContext(spec), spec, static=True, streams=InlineStreams())
    with pytest.raises(RiffusionError, match=r"static export takes \(4, 4, 8, 8\) \(up to 4 rows"):
        run(engine, unet_inputs(6))
    with pytest.raises(RiffusionError, match=r"input sample has shape \(2, 4, 8, 16\)"):
        run(engine, unet_inputs(2, width=16))


def test_a_shape_outside_the_profile_names_the_profile() -> None:
    spec = unet_spec(max_batch=2)
    engine = StageEngine("unet", StandInContext(spec), spec, static=False, streams=InlineStreams())
    with pytest.raises(
        RiffusionError,
        match=r"refused unet input sample of shape \(6, 4, 8, 8\).*\(1, 4, 8, 8\) to \(4, 4, 8, 8\)",
    ):
        run(engine, unet_inputs(6))


@pytest.mark.parametrize(
    ("refuse", "message"),
    [
        ("shape", "refused unet input"),
        ("address", "refused the address"),
        ("execute", "execute_async_v3 returned False"),
    ],
)
@pytest.mark.parametrize("static", [False, True])
def test_every_false_from_tensorrt_is_an_error(refuse: str, message: str, static: bool) -> None:
    spec = unet_spec(max_batch=2, static=static)
    engine = StageEngine(
        "unet", StandInContext(spec, refuse=refuse), spec, static=static, streams=InlineStreams()
    )
    with pytest.raises(RiffusionError, match=message):
        run(engine, unet_inputs(4 if static else 2))


def test_only_tensorrt_10_is_accepted() -> None:
    assert check_tensorrt_version(types.SimpleNamespace(__version__="10.16.1.11"))
    for version in ("11.4.0.106", "8.6.1"):
        with pytest.raises(RiffusionError, match=r"supports TensorRT 10\.x .*tensorrt>=10,<11"):
            check_tensorrt_version(types.SimpleNamespace(__version__=version))


def test_the_tensorrt_extra_excludes_tensorrt_11() -> None:
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    (tensorrt,) = [
        Requirement(r.split(";")[0])
        for r in requires("riffusion-engine") or []
        if r.startswith("tensorrt") and 'extra == "tensorrt"' in r
    ]
    assert "10.16.1" in tensorrt.specifier and "11.0.0" not in tensorrt.specifier


def test_every_output_of_a_two_output_stage_is_bound_and_returned() -> None:
    """DeepCache's UNet returns its noise and the feature it keeps: both addresses bound,
    both tensors sized from the spec, in its order, dynamic and static."""
    from riffusion_engine.export.specs import ModelDims

    dims = ModelDims(
        tokens=77, vocab=1000, text_hidden=32, latent_channels=4, vae_factor=8, unet_factor=2,
        block_channels=(8, 16), layers_per_block=1,
    )  # fmt: skip
    for static in (False, True):
        spec = stage_specs(
            dims, ShapeProfile(height=64, width=64, max_batch=2, static=static, deep_cache_branch=2)
        )["unet"]
        assert spec.output_names == ["noise_pred", "deep_feature"]
        context = StandInContext(spec)
        engine = StageEngine("unet", context, spec, static=static, streams=InlineStreams())
        inputs = unet_inputs(2)
        feature_shape = (2, 16, 4, 4)  # branch 2: block 1's up input, the mid block's 16 channels at 1/2
        noise, feature = engine.run(
            inputs, [tuple(inputs["sample"].shape), feature_shape], torch.device("cpu")
        )
        np.testing.assert_allclose(noise.numpy(), oracle(inputs), rtol=1e-6)
        assert tuple(feature.shape) == feature_shape
        assert set(context.addresses) >= {"noise_pred", "deep_feature"}


# -- TensorRT as pip installs it for CUDA 13 ------------------------------------------


@pytest.fixture
def cuda13_site(tmp_path, monkeypatch):
    """A site-packages laid out like the CUDA 13 wheels, on sys.path: ``tensorrt`` (the
    front package, from the ``tensorrt-cu13`` distribution, whose top-level module is
    ``tensorrt``) and ``nvidia/cu13/lib/libcudart.so.13``, where those wheels keep the CUDA
    runtime; no CUDA toolkit anywhere else. Returns a function that installs a version."""
    import importlib
    import sys

    site = tmp_path / "site-packages"
    (site / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "lib" / "libcudart.so.13").write_bytes(b"")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)

    def install(version: str):
        for old in site.glob("tensorrt_cu13-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        package = site / "tensorrt"
        package.mkdir(exist_ok=True)
        (package / "__init__.py").write_text(f'__version__ = "{version}"\n')
        info = site / f"tensorrt_cu13-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt-cu13\nVersion: {version}\n")
        (info / "top_level.txt").write_text("tensorrt\n")
        importlib.invalidate_caches()
        sys.modules.pop("tensorrt", None)
        module = importlib.import_module("tensorrt")
        monkeypatch.setitem(sys.modules, "tensorrt", module)  # gone again after the test
        return module

    return install


class StandInRuntime:
    """``tensorrt.Runtime``: a plan file names the stage it was built for; anything else
    is an engine it cannot load (None, as TensorRT returns)."""

    def __init__(self, logger) -> None:
        self.contexts: list[StandInContext] = []

    def deserialize_cuda_engine(self, data: bytes):
        if not data.startswith(b"stand-in plan"):
            return None
        spec = unet_spec(max_batch=2)
        runtime = self

        class Engine:
            def create_execution_context(self):
                runtime.contexts.append(StandInContext(spec))
                return runtime.contexts[-1]

        return Engine()


def stand_in_tensorrt(module) -> None:
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    module.Runtime = StandInRuntime


def test_engine_verification_runs_on_the_backends_runtime_not_polygraphys_cuda(
    cuda13_site, tmp_path, monkeypatch
) -> None:
    """Export verification of a built engine runs it as the TensorRT backend does, on torch's
    CUDA: polygraphy's TrtRunner would load libcudart through polygraphy's own search,
    which does not look in the CUDA 13 wheels' nvidia/cu13/lib (an OSError after every
    build on a machine without a system toolkit)."""
    from polygraphy.cuda import cuda as polygraphy_cuda
    from riffusion_engine.export.tensorrt_build import engine_runner
    from riffusion_engine.export.verify import Reference, VerificationError, verify_stage

    stand_in_tensorrt(cuda13_site("10.13.3.9"))

    def no_cuda_runtime(self) -> None:
        raise OSError("libcudart.so: cannot open shared object file")  # what polygraphy meets there

    monkeypatch.setattr(polygraphy_cuda.Cuda, "__init__", no_cuda_runtime)
    spec = unet_spec(max_batch=2)
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"stand-in plan")
    run, release = engine_runner(plan, spec, device="cpu")
    references = []
    for which in ("opt", "min", "max"):
        inputs = spec.sample_inputs(which=which, seed=3)
        references.append(Reference(inputs, [oracle({k: torch.from_numpy(v) for k, v in inputs.items()})]))
    report = verify_stage(run, spec, references, tolerance=1e-6, runtime="tensorrt")
    assert report["noise_pred"]["max_rel"] < 1e-6
    wrong = [Reference(r.inputs, [r.outputs[0] + 1]) for r in references]
    with pytest.raises(VerificationError, match="noise_pred"):
        verify_stage(run, spec, wrong, tolerance=1e-3, runtime="tensorrt")  # the check can fail
    release()
    plan.write_bytes(b"a plan from another TensorRT")
    with pytest.raises(RiffusionError, match="another TensorRT version"):
        engine_runner(plan, spec, device="cpu")


def test_the_tensorrt_version_from_the_cu13_distribution_is_in_the_cache_key(
    cuda13_site, tiny_export
) -> None:
    """``tensorrt`` is installed by the ``tensorrt-cu13`` distribution: the key records its
    version, and an export made under one TensorRT is not a cache hit under the next."""
    import json
    import shutil

    from riffusion_engine.export import exporter
    from riffusion_engine.export.artifacts import cache_key, tool_versions

    directory, _ = tiny_export
    cuda13_site("10.13.3.9")
    assert tool_versions(("tensorrt",)) == {"tensorrt": "10.13.3.9"}
    config = exporter.ExportConfig(model="random:tiny")
    before = cache_key(exporter.cache_key_fields(config))
    cuda13_site("10.16.1.11")
    assert tool_versions(("tensorrt",)) == {"tensorrt": "10.16.1.11"}
    after = cache_key(exporter.cache_key_fields(config))
    assert before != after
    made = directory.parent / "made-under-10.13"
    shutil.copytree(directory, made)
    manifest = json.loads((made / "manifest.json").read_text())
    manifest["cache_key"] = before
    (made / "manifest.json").write_text(json.dumps(manifest))
    assert exporter._cached(made, before) is not None  # the same TensorRT: a hit
    assert exporter._cached(made, after) is None  # upgraded: exported again


def test_engines_of_another_tensorrt_are_one_clear_error(tmp_path) -> None:
    from riffusion_engine.export.tensorrt_engine import check_built_by

    check_built_by("10.13.3.9", "10.13.3.9", tmp_path)
    check_built_by(None, "10.13.3.9", tmp_path)  # an export that did not record it: TensorRT decides
    with pytest.raises(
        RiffusionError, match=r"built by TensorRT 10\.13\.3\.9; TensorRT 10\.16\.1\.11 is installed"
    ):
        check_built_by("10.13.3.9", "10.16.1.11", tmp_path)
