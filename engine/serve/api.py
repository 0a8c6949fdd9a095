"""Riffusion's HTTP API: the original server's request and response, and the validation
that turns a request body into an engine request (shared by every serving front end);
the server's limits are :mod:`.config`'s."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ...kernels.audio import encode_audio
from ...kernels.errors import RiffusionError
from ..runtime.defaults import SEED_IMAGE
from ..runtime.pipeline import Engine
from ..runtime.prompts import MAX_PROMPT_CHARS
from ..runtime.requests import MAX_SEED, Clip, PromptInput, Request
from ..runtime.seeds import ID_PATTERN, SeedLibrary
from .config import DEFAULT_STEPS, FieldError, ServerConfig, checked_steps

# The largest seed the API takes: JSON numbers are doubles to most clients (JavaScript's
# Number.MAX_SAFE_INTEGER; the engine itself takes up to 2**63 - 1): every integer up to it
# survives a round trip through a double, so the bound means the same to every client.
MAX_API_SEED = 2**53 - 1
assert MAX_API_SEED <= MAX_SEED and float(MAX_API_SEED) == MAX_API_SEED


def _json_integer(value: Any) -> Any:
    """JSON's integers: a number with no fractional part (``3.0``) is one (JSON Schema's
    rule), so it validates as ``3``; strings and booleans stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]

MAX_GUIDANCE = 100.0
AUDIO_MIME = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac"}


# -- the original's request and response ------------------------------------------


class ApiPromptInput(BaseModel):
    """One end of the interpolation (the original's ``PromptInput``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="text prompt; (word:1.3) sets emphasis")
    seed: JsonInt = Field(ge=0, le=MAX_API_SEED, description="seed of the noise")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="what to avoid")
    denoising: float = Field(0.75, ge=0, le=1, allow_inf_nan=False, description="share of the steps run")
    guidance: float = Field(7.0, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, description="guidance scale")


class InferenceInput(BaseModel):
    """The body of ``POST /run_inference/`` (the original's ``InferenceInput``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    alpha: float = Field(ge=0, le=1, allow_inf_nan=False, description="position between start and end")
    num_inference_steps: JsonInt = Field(
        DEFAULT_STEPS, ge=1, description="scheduler steps (at most the server's max)"
    )
    seed_image_id: str = Field(SEED_IMAGE, pattern=ID_PATTERN.pattern, description="seed image to start from")
    mask_image_id: str | None = Field(
        None, pattern=ID_PATTERN.pattern, description="mask (white = regenerate)"
    )
    start: ApiPromptInput
    end: ApiPromptInput
    format: Literal["mp3", "wav", "flac"] = Field("mp3", description="audio format of the response")


class InferenceOutput(BaseModel):
    """The response of ``POST /run_inference/`` (the original's ``InferenceOutput``)."""

    image: str = Field(description="data:image/jpeg;base64,... the spectrogram, parameters in its EXIF")
    audio: str = Field(description="data:audio/mpeg;base64,... (or audio/wav, audio/flac)")
    duration_s: float = Field(description="length of the audio in seconds")


class ApiError(Exception):
    """An HTTP error answer: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def prompt_input(engine: Engine, name: str, value: ApiPromptInput) -> PromptInput:
    """The engine's :class:`PromptInput` for the API's ``name`` end, its texts checked
    (FieldError naming ``name.prompt`` or ``name.negative_prompt``)."""
    for field, text, negative in (
        ("prompt", value.prompt, False),
        ("negative_prompt", value.negative_prompt, True),
    ):
        if text is None:
            continue
        try:
            engine.check_text(text, negative=negative)
        except RiffusionError as exc:
            raise FieldError(f"{name}.{field}", str(exc)) from None
    guidance = engine.guidance if profiled(engine) else value.guidance
    return PromptInput(value.prompt, value.seed, value.negative_prompt, guidance, value.denoising)


def profiled(engine: Engine) -> bool:
    """Whether the engine runs a profile other than the default recipe (``serve --profile
    realtime``): then its scheduler, steps and guidance replace the client's, which a
    few-step LoRA could not use (the web app asks for 50 steps at guidance 7)."""
    return engine.choices is not None and engine.choices.profile.name != "default"


def profile_name(engine: Engine) -> str:
    return engine.choices.profile.name if engine.choices is not None else "default"


def parse_input(body: bytes) -> InferenceInput:
    """The request body as :class:`InferenceInput` (JSON whatever the Content-Type)."""
    try:
        return InferenceInput.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ApiError(400, f"body is not JSON: {errors[0]['msg']}") from None
        lines = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:8]]
        raise ApiError(422, "; ".join(lines)) from None


def engine_request(
    inputs: InferenceInput, engine: Engine, seeds: SeedLibrary, config: ServerConfig
) -> Request:
    """The engine request for ``inputs``, every field checked (ApiError naming the field)."""
    # Left out: the API's default (50), or the server's cap where that is lower.
    given = inputs.num_inference_steps if "num_inference_steps" in inputs.model_fields_set else None
    try:
        steps = checked_steps(config, given)
    except FieldError as exc:
        raise ApiError(422, str(exc)) from None
    steps = engine.steps if profiled(engine) else steps

    def image(field_name: str, image_id: str, mode: str) -> Any:
        try:
            return seeds.get(image_id, field=field_name, mode=mode)
        except RiffusionError as exc:
            raise ApiError(400, str(exc)) from None

    def checked(name: str, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except RiffusionError as exc:
            raise ApiError(422, f"{name}: {exc}") from None

    seed_image = image("seed_image_id", inputs.seed_image_id, "RGB")
    mask = image("mask_image_id", inputs.mask_image_id, "L") if inputs.mask_image_id else None
    try:
        ends = [
            prompt_input(engine, name, end) for name, end in (("start", inputs.start), ("end", inputs.end))
        ]
    except FieldError as exc:
        raise ApiError(422, str(exc)) from None
    request = checked(
        "seed_image_id",
        lambda: Request(
            ends[0],
            ends[1],
            inputs.alpha,
            steps,
            seed_image.width,
            scheduler=engine.scheduler,  # the profile's, or serve --scheduler
            seed_image=seed_image,
            mask=mask,
        ),
    )
    # The prompts were checked above, field by field.
    checked("seed_image_id" if mask is None else "mask_image_id", lambda: engine.check_images(request))
    return request


def jpeg_data_url(image: Any) -> str:
    """A spectrogram image as a JPEG data URL, its EXIF (parameters) kept."""
    jpeg = io.BytesIO()
    image.convert("RGB").save(jpeg, format="JPEG", exif=image.getexif())
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()


def encode_output(clip: Clip, fmt: str) -> dict[str, Any]:
    """The original's response: JPEG image (EXIF kept) and audio as data URLs."""
    audio = encode_audio(clip.audio, clip.sample_rate, fmt)
    return {
        "image": jpeg_data_url(clip.image),
        "audio": f"data:{AUDIO_MIME[fmt]};base64," + base64.b64encode(audio).decode(),
        "duration_s": clip.duration_s,
    }
