"""riffusion-engine: Riffusion (Stable Diffusion v1.5 on spectrogram images, turned into
audio by Griffin-Lim) exported to ONNX / TensorRT and run on torch, ONNX Runtime,
OpenVINO or TensorRT.

The public API::

    from riffusion_engine import load

    engine = load("random:tiny")  # or a model directory, a hub id, an export directory
    engine.generate("jazzy rapping from paris", steps=20).save("clip.wav")

The package's layers import one way: ``kernels`` (spectrogram DSP) below ``export`` (the
model, its stages and artifacts) below ``engine`` (the runtime and the applications on it).
"""

# Absolute imports here alone: a test runner collecting the repository's root imports this
# file under the folder's name, and these must still name the one package.
from riffusion_engine.engine.runtime.loading import load
from riffusion_engine.engine.runtime.pipeline import Engine
from riffusion_engine.engine.runtime.requests import Blend, Cancelled, Clip, PromptInput, Request
from riffusion_engine.engine.stream import Stream, StreamChunk, StreamSettings
from riffusion_engine.kernels import GriffinLimOptions, RiffusionError, SpectrogramParams

__all__ = [
    "Blend",
    "Cancelled",
    "Clip",
    "Engine",
    "GriffinLimOptions",
    "PromptInput",
    "Request",
    "RiffusionError",
    "SpectrogramParams",
    "Stream",
    "StreamChunk",
    "StreamSettings",
    "load",
]
