"""Stage timings on a device that queues work: each stage's time covers its own work.

On CUDA, torch, TensorRT and ONNX Runtime return from a call once its kernels are
queued. The stand-in backend here does the same on the CPU: a call returns at once
(with random:tiny's real output for those inputs, computed once beforehand) and adds
the stage's cost to a device clock that only ``synchronize`` waits out. A timer that
did not wait would give the UNet the time of its launches and the VAE decoder the
UNet's queued work.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from riffusion_engine.engine.runtime.backends import Backend  # noqa: E402
from riffusion_engine.engine.runtime.pipeline import Engine  # noqa: E402
from riffusion_engine.engine.runtime.requests import PromptInput, Request  # noqa: E402

COST = {"text_encoder": 0.05, "unet": 0.25, "vae_decoder": 0.2, "vae_encoder": 0.2}  # seconds a call


class QueuingDevice(Backend):
    """Returns each call's output at once and queues the stage's cost on a device clock,
    which ``synchronize`` waits out, as a GPU's queue does."""

    name = "queuing"
    device = "cpu"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.busy_until = time.perf_counter()
        self.outputs: dict[Any, Any] = {}

    def run(self, stage: str, inputs: dict[str, Any]) -> Any:
        key = (stage, *((k, tuple(v.shape)) for k, v in sorted(inputs.items())))
        if key not in self.outputs:  # the real output, once per shape (see `queued`)
            self.outputs[key] = self.inner.run(stage, inputs)
        self.busy_until = max(self.busy_until, time.perf_counter()) + COST[stage]
        return self.outputs[key].clone()

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.busy_until - time.perf_counter()))


TEXT = Request(PromptInput("a funky beat", seed=1), steps=4)


@pytest.fixture(scope="module")
def seed_request() -> Request:
    from PIL import Image

    image = Image.new("RGB", (512, 512), (40, 40, 40))
    return Request(PromptInput("jazz", seed=2, denoising=0.5), steps=6, seed_image=image)


@pytest.fixture(scope="module")
def queued(torch_engine, seed_request) -> Engine:
    e = torch_engine
    engine = Engine(QueuingDevice(e.backend), e.tokenizer, e.scheduler_config, e.shape)
    engine.run([TEXT])  # every stage's output computed once: the timed runs only queue
    engine.run([seed_request])
    engine.backend.synchronize()
    return engine


def test_each_stage_timer_waits_for_its_own_queued_work(queued: Engine) -> None:
    t = queued.run([TEXT])[0].timings
    unet_work = t["unet_steps"] * COST["unet"]
    assert t["unet"] >= unet_work  # the loop's time includes the work it queued
    # The decoder's time is its own: the UNet's queued work was waited for before it began.
    assert COST["vae_decoder"] <= t["vae_decoder"] < COST["vae_decoder"] + unet_work / 2


def test_seed_image_encoder_is_timed_apart_from_the_denoising(queued: Engine, seed_request) -> None:
    t = queued.run([seed_request])[0].timings
    unet_work = t["unet_steps"] * COST["unet"]
    assert t["vae_encoder"] >= COST["vae_encoder"]
    # The loop's clock starts once the encoder's work is done.
    assert unet_work <= t["unet"] < unet_work + COST["vae_encoder"] / 2
    assert COST["vae_decoder"] <= t["vae_decoder"] < COST["vae_decoder"] + unet_work / 2
