"""Endless streams: Riffusion's alpha walk as a sequence of ordinary requests, joined
into gapless audio, with the diffusion of the next clips overlapping the audio of this one.

The walk follows Riffusion's web app. Each prompt end has a seed; the end of a pair
defaults to the start's prompt with the next seed, so a steady prompt still moves. The
first clip is alpha 0 (the start itself); every clip adds ``alpha_step``; once alpha
passes 1 it wraps (``alpha - 1``), the end becomes the start, and the next queued
prompt, if any, becomes the end (else the new start's prompt with the next seed). The
clip at alpha 1 and the would-be clip at alpha 0 of the next pair are the same
request, so the walk never repeats it. A prompt queued while clip ``n`` is the newest
one started is the end from the next wrap on; :meth:`Stream.update` changes the start,
end, seed image or mask from the next clip that has not begun.

Joins. Clip ``n`` ends with a tail of ``C`` samples that is crossfaded into the head of
clip ``n + 1`` with an equal-power fade (``cos`` out, ``sin`` in, over ``C`` samples), so
``N`` clips of ``L`` samples make exactly ``N * L - (N - 1) * C`` samples. A chunk holds
back its clip's tail until the next clip arrives (the last tail comes when the stream
stops). With ``continuation``, clip ``n + 1`` keeps clip ``n``'s last ``K`` spectrogram
columns: its seed image starts with them and its mask keeps them (black) and
regenerates the rest; after decoding they are put back pixel for pixel, so the two clips
hold the same spectrogram there, and the crossfade spans exactly those columns' audio
(``C = (K - 1) * hop`` samples).

Pipelining. A diffusion thread turns requests into spectrogram images (``lookahead``
clips as one batch); with ``pipeline`` (by default on a GPU only: on a CPU both stages
share the same cores, and measured no faster) an audio thread turns images into audio
and joins them while the next clips denoise (on a GPU, in a CuPy stream of its own). The
reader's side is a bounded buffer: a reader that stops reading stops the stream after
``buffer`` chunks, never grows its memory.
"""

from .settings import (
    Runner,
    StreamChunk,
    StreamSettings,
    advance_samples,
    clip_samples,
    clips_for,
    length_samples,
    overlap_samples,
)
from .stream import Stream, audio_cuda_stream
from .walk import Walk, continuation_inputs

__all__ = [
    "Runner",
    "Stream",
    "StreamChunk",
    "StreamSettings",
    "Walk",
    "advance_samples",
    "audio_cuda_stream",
    "clip_samples",
    "clips_for",
    "continuation_inputs",
    "length_samples",
    "overlap_samples",
]
