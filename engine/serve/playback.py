"""A ``/stream`` client's playback as the server models it: each chunk begins playing
when it has arrived and the chunk before has ended (a client that plays audio as soon as
it has it), anchored at the last clip the client said began. From it come the clip a
steer keeps (the one playing) and each prompt's ``prompt_to_ear_s``."""

from __future__ import annotations

from typing import Any

MAX_PROMPTS = 64  # prompts no clip has moved toward yet that are remembered: the newest


class Playback:
    """The clips sent and played, and the prompts on their way to the listener's ear."""

    def __init__(self) -> None:
        self.played = -1  # the last clip the client said began playing
        self.sent = -1  # the last clip sent (a steer may drop the ones after the one playing)
        self.highest = -1  # the highest clip index ever sent (a dropped one's report may still come)
        self.timeline: dict[int, tuple[float, float]] = {}  # sent clip -> (send time, seconds)
        self.anchor: tuple[int, float] | None = None  # the last clip said to begin, and when
        self.toward: list[tuple[Any, float]] = []  # prompts no clip moved toward, and when they came
        self.hearing: dict[int, float] = {}  # a sent clip moving toward a prompt -> when the prompt came

    def sent_clip(self, index: int, at: float, seconds: float) -> None:
        self.timeline[index] = (at, seconds)
        self.sent = index
        self.highest = max(self.highest, index)

    def played_clip(self, clip: int, now: float) -> list[float]:
        """The client says ``clip`` began: the prompt-to-ear seconds of the clips toward a
        prompt it has now heard. A clip not sent (one a rewind dropped, the report on its
        way) never counts."""
        clip = min(clip, self.sent)
        if clip > self.played:
            self.anchor = (clip, now)
            for i in [i for i in self.timeline if i < clip]:
                del self.timeline[i]
        self.played = max(self.played, clip)
        return [now - self.hearing.pop(i) for i in sorted(self.hearing) if i <= clip]

    def begins(self, upto: int, now: float) -> list[float]:
        """When the client begins playing clips ``anchor .. upto`` (clip ``upto`` sent
        ``now`` if it is not sent yet), from the anchor (else clip 0's arrival)."""
        first, begins = self.anchor if self.anchor is not None else (0, None)
        out = []
        for i in range(first, upto + 1):
            sent, seconds = self.timeline.get(i, (now, 0.0))
            begins = sent if begins is None else max(sent, begins)
            out.append(begins)
            begins += seconds
        return out

    def playing_at(self, moment: float) -> int:
        """The last clip sent that the client will have begun playing at ``moment``."""
        if self.sent < 0:
            return -1
        first = self.anchor[0] if self.anchor is not None else 0
        begun = [i for i, t in enumerate(self.begins(self.sent, moment), first) if t <= moment]
        return max([self.played, *begun[-1:]])

    def drop_after(self, keep: int) -> float:
        """A rewind dropped the clips sent after ``keep``: the seconds of audio they held."""
        dropped = 0.0
        for index in range(keep + 1, self.sent + 1):
            dropped += self.timeline.pop(index, (0.0, 0.0))[1]
            self.hearing.pop(index, None)
        self.sent = min(self.sent, keep)
        return dropped

    def prompt(self, prompt: Any, received: float, *, replaces: bool) -> None:
        """A prompt came at ``received`` (``replaces``: the prompts before it will never
        be walked to)."""
        if replaces:
            self.toward.clear()
        self.toward.append((prompt, received))
        del self.toward[:-MAX_PROMPTS]

    def prompt_to_ear(self, index: int, request: Any, now: float) -> float | None:
        """For the first clip that moves toward a prompt (its end, alpha > 0), about to
        be sent ``now``: seconds from the prompt's message to when playback reaches it.
        Prompts before it that no clip moved toward are passed over."""
        found = next(
            (i for i, (p, _) in enumerate(self.toward) if p is request.end and request.alpha > 0), None
        )
        if found is None:
            return None
        received = self.toward[found][1]
        del self.toward[: found + 1]
        self.hearing[index] = received
        return self.begins(index, now)[-1] - received
