"""Prompts: emphasis syntax, tokenization with truncation, weighted embeddings.

The syntax is the one Riffusion accepted through the long-prompt-weighting pipeline it
built on: ``(words)`` multiplies their weight by 1.1, ``[words]`` divides it by 1.1,
``(words:1.3)`` sets it, brackets nest, and ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal.
After encoding, each token's embedding is scaled by its weight and the whole is
rescaled to keep its mean, as that pipeline does. A prompt without emphasis gives
exactly the tokens and embeddings of a plain tokenizer call.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...kernels.errors import RiffusionError

log = logging.getLogger(__name__)

EMPHASIS = 1.1
MAX_WEIGHT = 100.0  # the largest emphasis weight, (text:W), in size
_TOKEN = re.compile(
    r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\)|\)|]|[^\\()\[\]:]+|:"
)


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` as (text, weight) pieces; unbalanced brackets close at the end."""
    pieces: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])
        elif text == "(":
            round_open.append(len(pieces))
        elif text == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            multiply(round_open.pop(), EMPHASIS)
        elif text == "]" and square_open:
            multiply(square_open.pop(), 1 / EMPHASIS)
        else:
            pieces.append([text, 1.0])
    for start in round_open:
        multiply(start, EMPHASIS)
    for start in square_open:
        multiply(start, 1 / EMPHASIS)
    merged: list[tuple[str, float]] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged


@dataclass(frozen=True)
class Tokens:
    """A prompt's token ids and per-token weights, padded to the encoder's length."""

    ids: np.ndarray  # (tokens,) int32
    weights: np.ndarray  # (tokens,) float32; 1 for special tokens and padding

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1).any())


MAX_PROMPT_CHARS = 4096  # longer text is refused before tokenizing


_WARNED: OrderedDict[str, None] = OrderedDict()  # prompts already warned about, the latest 256
_WARNED_LOCK = threading.Lock()


def _warn_truncated(prompt: str, what: str, tokens: int, dropped: str) -> None:
    """Warn once per prompt (a prompt is tokenized by each check and by its encoding),
    naming the start of what was dropped."""
    with _WARNED_LOCK:
        if prompt in _WARNED:
            _WARNED.move_to_end(prompt)
            return
        _WARNED[prompt] = None
        if len(_WARNED) > 256:
            _WARNED.popitem(last=False)
    shown = dropped if len(dropped) <= 60 else f"{dropped[:60]}... ({len(dropped) - 60} more characters)"
    log.warning("%s is longer than %d tokens; dropped: %r", what, tokens, shown)


def tokenize(tokenizer: Any, prompt: str, *, allow_empty: bool = False, what: str = "prompt") -> Tokens:
    """Token ids and weights of ``prompt``; over-long prompts are truncated with a warning."""
    if not isinstance(prompt, str):
        raise RiffusionError(f"{what} must be text, got {type(prompt).__name__}")
    if not prompt.strip() and not allow_empty:
        raise RiffusionError(f"{what} is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RiffusionError(f"{what} has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    length = tokenizer.model_max_length
    pieces = parse_weights(prompt)
    for text, weight in pieces:
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise RiffusionError(
                f"{what}: the emphasis weight of {text.strip()!r} is {weight:g}; weights must be finite "
                f"and at most {MAX_WEIGHT:g} in size (text embeddings scaled further overflow)"
            )
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in pieces:
        piece_ids = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    if all(w == 1.0 for w in weights):
        # No emphasis: the plain tokenizer call (diffusers' own), so unweighted prompts
        # encode exactly as the reference pipeline encodes them.
        text = "".join(t for t, _ in pieces)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        weights = [1.0] * len(ids)
    if len(ids) > length - 2:
        _warn_truncated(prompt, what, length - 2, tokenizer.decode(ids[length - 2 :]))
        ids, weights = ids[: length - 2], weights[: length - 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    weights = [1.0, *weights, 1.0]
    padding = length - len(ids)
    return Tokens(
        ids=np.array(ids + [pad] * padding, dtype=np.int32),
        weights=np.array(weights + [1.0] * padding, dtype=np.float32),
    )


def apply_weights(embeddings: Any, weights: Any) -> Any:
    """Scale each token's embedding ``(batch, tokens, hidden)`` by its weight
    ``(batch, tokens)``, then restore the mean (long-prompt-weighting's rule)."""
    previous = embeddings.float().mean(dim=(-2, -1), keepdim=True)
    scaled = embeddings * weights[..., None]
    current = scaled.float().mean(dim=(-2, -1), keepdim=True)
    return scaled * (previous / current).to(embeddings.dtype)
