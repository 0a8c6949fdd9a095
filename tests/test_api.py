"""The public API: flat, stable, and light to import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import riffusion_engine

# The documented API (README, "Python"): a name leaves it only by a deliberate change here.
PUBLIC = set(
    "Blend Cancelled Clip Engine GriffinLimOptions PromptInput Request RiffusionError SpectrogramParams "
    "Stream StreamChunk StreamSettings load".split()
)


def test_the_public_names_are_the_documented_ones() -> None:
    assert set(riffusion_engine.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(riffusion_engine, name) is not None


def test_the_flat_names_are_the_runtime_s_own_objects() -> None:
    from riffusion_engine.engine.runtime.loading import load
    from riffusion_engine.engine.runtime.pipeline import Engine
    from riffusion_engine.engine.runtime.requests import PromptInput, Request
    from riffusion_engine.engine.stream import Stream

    assert riffusion_engine.load is load
    assert riffusion_engine.Engine is Engine
    assert riffusion_engine.PromptInput is PromptInput
    assert riffusion_engine.Request is Request
    assert riffusion_engine.Stream is Stream


def test_load_takes_a_model_or_an_export_and_keyword_options() -> None:
    parameters = inspect.signature(riffusion_engine.load).parameters
    assert list(parameters)[:2] == ["model", "artifacts"]
    assert parameters["model"].default is None
    for name in ("artifacts", "backend", "device", "precision", "cache_dir", "seed", "progress"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["backend"].default == "auto" and parameters["device"].default == "cpu"


def test_importing_the_package_loads_no_model_library() -> None:
    code = (
        "import sys, riffusion_engine; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime', 'cupy', 'tensorrt') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
