"""``doctor``'s rows for the realtime profile on CUDA.

The realtime profile (``--profile realtime``: a few-step LoRA fused into the UNet, its
scheduler, guidance off, the tiny VAE, fp16 on CUDA) on ``random:tiny`` with its random
LoRA and TAESD, each path against the torch fp32 run of the same profile on the same GPU
(the realtime profile's own reference, itself equal to diffusers on the CPU,
``tests/test_realtime.py``): torch in fp16 with ``lcm`` and ``tcd``, ONNX Runtime's CUDA
provider and TensorRT on the exports made on first use (guidance off: the UNet's
TensorRT profile is one row per clip at its optimum, up to ``max_batch``), and the server
at ``--max-batch`` 4 answering three requests at once. Every row needs CUDA, so on a CPU
they are skipped, each naming what it needs.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError

MODEL = "random:tiny"
PROFILE = "realtime"
Row = Callable[[], tuple[float | None, float | None, str]]


class RealtimeRows:
    """The realtime rows of a :class:`~.doctor.Doctor` (its ``require``, ``work`` and ``steps``)."""

    def __init__(self, doctor: Any, *, tolerance: float, device: str = "cuda") -> None:
        self.doctor = doctor
        self.device = device  # cuda; cpu runs the same rows' logic in the tests (torch fp32 there)
        self.tolerance = tolerance  # largest image difference for fp16 (the doctor's)
        self._reference: Any = None
        self._images: dict[tuple[int, str], np.ndarray] = {}

    def rows(self) -> Iterator[tuple[str, Row]]:
        yield "realtime: torch cuda fp32 (its reference)", self.reference_row
        yield "realtime: torch cuda fp16, lcm, TAESD, LoRA", lambda: self.torch("lcm")
        yield "realtime: torch cuda fp16, tcd", lambda: self.torch("tcd")
        yield "realtime: onnxruntime cuda fp16 (first use)", self.onnxruntime
        yield "realtime: tensorrt fp16 (first use, batch 1)", self.tensorrt
        yield "realtime: server cuda, --max-batch 4, 3 at once", self.server

    # -- the reference ----------------------------------------------------------------

    def requests(self, count: int, scheduler: str = "lcm") -> list[Any]:
        """``count`` requests of the profile's kind (guidance off) that share a batch."""
        from ..runtime.requests import PromptInput, Request

        alphas = (0.0, 0.5, 1.0)
        return [
            Request(
                PromptInput("a funky beat", seed=i + 1, guidance=1.0),
                PromptInput("church bells", seed=i + 11, guidance=1.0),
                alphas[i % 3],
                steps=self.doctor.steps,
                scheduler=scheduler,
            )
            for i in range(count)
        ]

    def reference(self, count: int, scheduler: str = "lcm") -> np.ndarray:
        from ..runtime.loading import load

        self.doctor.require("cuda")
        if self._reference is None:
            self._reference = load(
                MODEL, backend="torch", device=self.device, profile=PROFILE, precision="fp32"
            )
        key = (count, scheduler)
        if key not in self._images:
            images = self._reference.images(self.requests(count, scheduler))
            self._images[key] = images.float().cpu().numpy()
        return self._images[key]

    def compare(
        self, engine: Any, scheduler: str = "lcm", counts: tuple[int, ...] = (1, 3)
    ) -> tuple[float, str]:
        worst = 0.0
        for count in counts:
            got = engine.images(self.requests(count, scheduler)).float().cpu().numpy()
            worst = max(worst, float(np.abs(got - self.reference(count, scheduler)).max()))
        batches = ", ".join(str(c) for c in counts)
        return worst, f"images of {batches} request(s) ({scheduler}) vs torch fp32, same profile and device"

    def reference_row(self) -> tuple[None, None, str]:
        self.reference(1)
        self.reference(3)
        choices = self._reference.choices
        return None, None, choices.describe() if choices is not None else "realtime"

    # -- the rows -------------------------------------------------------------------

    def _engine(self, backend: str, **options: Any) -> Any:
        from ..runtime.loading import load

        engine = load(
            MODEL,
            backend=backend,
            device=self.device,
            profile=PROFILE,
            cache_dir=self.doctor.work / "realtime",
            **options,
        )
        choices = engine.choices
        half = self.device != "cuda" or (choices is not None and choices.precision == "fp16")
        if choices is None or not half or engine.guidance > 1 or choices.vae != "tiny" or not choices.loras:
            ran = choices.describe() if choices is not None else "no profile"
            raise RiffusionError(f"the realtime profile on {self.device} ran {ran}")
        return engine

    def torch(self, scheduler: str) -> tuple[float, float, str]:
        self.doctor.require("cuda")
        engine = self._engine("torch")
        decoder = engine.backend.modules["vae_decoder"]
        dtype = next(decoder.parameters()).dtype
        if self.device == "cuda" and str(dtype) != "torch.float16":
            raise RiffusionError(f"the tiny VAE ran in {dtype}, not fp16")
        error, detail = self.compare(engine, scheduler)
        return error, self.tolerance, f"{detail}; TAESD in {dtype}"

    def onnxruntime(self) -> tuple[float, float, str]:
        self.doctor.require("cuda", "onnxruntime-cuda")
        engine = self._engine("onnxruntime")
        error, detail = self.compare(engine)
        return error, self.tolerance, detail

    def tensorrt(self) -> tuple[float, float, str]:
        self.doctor.require("cuda", "tensorrt")
        engine = self._engine("tensorrt")
        spec = engine.backend.spec("unet")
        (sample,) = [t for t in spec.inputs if t.name == "sample"]
        rows = (sample.shape[0].min, sample.shape[0].opt, sample.shape[0].max)
        if rows[:2] != (1, 1) or rows[2] < 3:
            raise RiffusionError(
                f"the realtime UNet's TensorRT profile takes rows {rows}, not 1 at its optimum"
            )
        error, detail = self.compare(engine)
        return error, self.tolerance, f"{detail}; UNet rows min/opt/max {rows}"

    def server(self) -> tuple[float, float, str]:
        """Three requests at once to a server batching up to 4: each answer's spectrogram is
        its own request's one-shot image (batching changes fp16 rounding only)."""
        import httpx

        from ..runtime.seeds import SeedLibrary
        from ..serve.api import engine_request, jpeg_data_url, parse_input
        from ..serve.app import background, create_app
        from ..serve.config import ServerConfig

        self.doctor.require("cuda", "cupy")
        engine = self._engine("torch")
        config = ServerConfig(max_batch=4, batch_window_ms=200.0)
        bodies = [
            {
                "alpha": alpha,
                "num_inference_steps": self.doctor.steps,
                "start": {"prompt": "church bells", "seed": 42 + i, "guidance": 1.0},
                "end": {"prompt": "jazz with piano", "seed": 123 + i, "guidance": 1.0},
                "format": "wav",
            }
            for i, alpha in enumerate((0.0, 0.5, 0.75))
        ]
        answers: list[Any] = [None] * len(bodies)
        with background(create_app(engine, config, model=MODEL)) as url:

            def post(index: int) -> None:
                answers[index] = httpx.post(
                    url + "/run_inference/", content=json.dumps(bodies[index]), timeout=300
                )

            threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        served = []
        for answer in answers:
            if answer is None or answer.status_code != 200:
                text = "no answer" if answer is None else f"{answer.status_code}: {answer.text[:200]}"
                raise RiffusionError(f"the server answered {text}")
            served.append(pixels(answer.json()["image"]))
        alone = []
        for body in bodies:
            request = engine_request(parse_input(json.dumps(body).encode()), engine, SeedLibrary(), config)
            (clip,) = engine.run([request])
            alone.append(pixels(jpeg_data_url(clip.image)))  # as the server encodes it
        distance = np.array([[np.abs(s - a).max() for a in alone] for s in served])
        if (distance.argmin(axis=1) != np.arange(len(bodies))).any():
            raise RiffusionError(
                f"an answer is nearer another request's clip than its own: {distance.round(3)}"
            )
        worst = float(distance.diagonal().max())
        return worst, self.tolerance, "each answer's image vs its request's one-shot run (3 requests at once)"


def pixels(data_url: str) -> np.ndarray:
    """An image data URL's pixels, RGB floats in [0, 1]."""
    from PIL import Image

    data = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255
