"""``/stream``'s control messages: their schemas (the protocol in ``streams.py``'s
docstring), the parse that names the field of a refused one, and the checks of the
values they carry (prompts, widths, image ids) as message errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ...kernels.errors import RiffusionError
from ..runtime.defaults import SEED_IMAGE
from ..runtime.pipeline import Engine
from ..runtime.requests import PromptInput
from ..runtime.seeds import ID_PATTERN, SeedLibrary
from ..stream.opus import MAX_BITRATE, MIN_BITRATE
from .api import ApiPromptInput, JsonInt, prompt_input
from .config import FieldError


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StartMessage(_Message):
    type: Literal["start"]
    start: ApiPromptInput
    end: ApiPromptInput | None = None
    seed_image_id: str = Field(SEED_IMAGE, pattern=ID_PATTERN.pattern)
    mask_image_id: str | None = Field(None, pattern=ID_PATTERN.pattern)
    num_inference_steps: JsonInt | None = Field(None, ge=1)
    alpha_step: float = Field(0.25, gt=0, le=1, allow_inf_nan=False)
    crossfade_s: float = Field(0.2, ge=0, le=2.5, allow_inf_nan=False)
    continuation: bool = False
    width: JsonInt | None = Field(None, ge=8)  # pixels per clip; None: the seed image's
    # The profile the client expects; the server runs one (serve --profile), and refuses another.
    profile: Literal["default", "realtime"] | None = None
    # The audio frames' codec: 16-bit PCM, or Opus (48 kHz; its bits per second: bitrate,
    # by default the server's --stream-opus-kbps).
    format: Literal["pcm_s16le", "opus"] = "pcm_s16le"
    bitrate: JsonInt | None = Field(None, ge=MIN_BITRATE, le=MAX_BITRATE)


class PromptMessage(_Message):
    type: Literal["prompt"]
    prompt: ApiPromptInput
    when: Literal["wrap", "now", "jump"] = "wrap"  # walk.WHEN


class UpdateMessage(_Message):
    type: Literal["update"]
    start: ApiPromptInput | None = None
    end: ApiPromptInput | None = None
    seed_image_id: str | None = Field(None, pattern=ID_PATTERN.pattern)
    mask_image_id: str | None = Field(None, pattern=ID_PATTERN.pattern)


class PlayedMessage(_Message):
    type: Literal["played"]
    clip: JsonInt = Field(ge=0)


class ControlMessage(_Message):
    type: Literal["pause", "resume", "stop"]


Message = Annotated[
    StartMessage | PromptMessage | UpdateMessage | PlayedMessage | ControlMessage,
    Field(discriminator="type"),
]
_MESSAGES: TypeAdapter[Any] = TypeAdapter(Message)


class MessageError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_message(text: str) -> Any:
    """A control message; MessageError naming the field for anything else."""
    try:
        return _MESSAGES.validate_json(text)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        if error["type"] == "json_invalid":
            raise MessageError("message", f"not JSON: {error['msg']}") from None
        loc = [str(p) for p in error["loc"]]
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            kinds = "start, prompt, update, played, pause, resume, stop"
            raise MessageError("type", f"must be one of {kinds}") from None
        field = ".".join(loc[1:]) or "message"  # loc[0] is the message type
        raise MessageError(field, error["msg"]) from None


def message_prompt(engine: Engine, name: str, value: ApiPromptInput) -> PromptInput:
    """The API's validation of a prompt input (``/run_inference/``'s), as a message error."""
    try:
        return prompt_input(engine, name, value)
    except FieldError as exc:
        raise MessageError(exc.field, exc.reason) from None


def message_width(engine: Engine, width: int, widest: int, seed_image_id: str) -> int:
    """A stream's clip width, checked: a multiple of 8 that the engine's export takes and
    its seed image spans."""
    if width % 8:
        raise MessageError("width", f"must be a multiple of 8 pixels (100 per second), got {width}")
    if width > widest:  # first: no server flag makes a clip wider than its seed image
        raise MessageError(
            "width", f"{width} is wider than the seed image {seed_image_id!r} ({widest} pixels)"
        )
    try:
        engine.check_width(width)
    except RiffusionError as exc:
        raise MessageError("width", str(exc)) from None
    return width


def message_image(seeds: SeedLibrary, field: str, image_id: str | None, mode: str) -> Any:
    if image_id is None:
        return None
    try:
        return seeds.get(image_id, field=field, mode=mode)
    except RiffusionError as exc:
        raise MessageError(field, str(exc)) from None
