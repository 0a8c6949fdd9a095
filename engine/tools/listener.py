"""A ``/stream`` client that listens in real time on its own clock, without a sound card:
each chunk begins playing as soon as it has arrived and the chunk before has ended, and
it tells the server ``played`` when a clip begins, and drops the clips a ``rewind`` event
names before they play, as the player page does. It measures
what a listener hears: underruns (a chunk that came after the one before had ended) and,
for each prompt it sends, the seconds from sending it to hearing the first clip that
moves toward it (the server's ``prompt_to_ear_s``, measured on the client's side).
``benchmarks/bench_stream.py --steer`` and the tests drive streams with it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed


@dataclass
class Reaction:
    """One prompt sent, and when its music was heard."""

    prompt: str
    when: str  # wrap, now or jump
    sent: float  # monotonic seconds
    index: int | None = None  # the first clip toward it
    heard: float | None = None  # when that clip began playing, on the listener's clock
    server_s: float | None = None  # the clip event's prompt_to_ear_s

    @property
    def client_s(self) -> float | None:
        return None if self.heard is None else self.heard - self.sent


class Listener:
    """Listens to one ``/stream`` socket (a ``websockets.sync`` connection) in real time."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.sample_rate = 44100
        self.channels = 1
        self.play_end: float | None = None  # when the audio received so far ends playing
        self.begins: dict[int, float] = {}  # clip index -> when it began playing
        self.untold: list[tuple[int, float]] = []  # clips not yet said to have begun
        self.clips: list[tuple[dict[str, Any], bytes]] = []  # clip and tail events with their audio
        self.events: list[dict[str, Any]] = []  # every event, in order
        self.reactions: list[Reaction] = []
        self.underruns = 0  # chunks after the first that came after the one before had ended
        self.cuts = 0  # rewinds that came after a dropped clip had begun playing
        self.audio_s = 0.0

    def tell(self) -> None:
        """Say ``played`` for the clips that have begun. Once the server has closed the
        socket (after a stop, its tail and ``stopped``), nobody is left to tell: the events
        it sent before closing are still read, so the listener goes on without telling."""
        now = time.monotonic()
        for index, begins in [u for u in self.untold if u[1] <= now]:
            try:
                self.ws.send(json.dumps({"type": "played", "clip": index}))
            except ConnectionClosed:
                self.untold.clear()
                return
            self.untold.remove((index, begins))

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def steer(self, prompt: dict[str, Any], when: str = "now") -> Reaction:
        """Send a prompt message; its reaction fills in once its first clip is heard."""
        reaction = Reaction(prompt["prompt"], when, time.monotonic())
        self.send({"type": "prompt", "prompt": prompt, "when": when})
        self.reactions.append(reaction)
        return reaction

    def next_event(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next event (a clip's or tail's audio scheduled with it), telling ``played``
        while waiting. TimeoutError when none comes in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no event from the stream in {timeout:g} s")
            event = self._receive(min(0.01, left))
            if event is not None:
                return event

    def pump(self, seconds: float) -> list[dict[str, Any]]:
        """Listen for ``seconds``: the events that came meanwhile."""
        deadline = time.monotonic() + seconds
        events = []
        while time.monotonic() < deadline:
            event = self._receive(max(0.0, min(0.01, deadline - time.monotonic())))
            if event is not None:
                events.append(event)
        return events

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        self.tell()
        try:
            text = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        event = json.loads(text)
        self.events.append(event)
        if event["type"] == "ready":
            self.sample_rate, self.channels = event["sample_rate"], event["channels"]
        if event["type"] in ("clip", "tail"):
            self._schedule(event, self.ws.recv(timeout=120.0))
        if event["type"] == "rewind":
            self._rewind(event["after"])
        return event

    def _seconds(self, audio: bytes) -> float:
        return len(audio) / 2 / self.channels / self.sample_rate

    def _rewind(self, after: int) -> None:
        """Drop the clips after ``after``: their audio is not played; the next chunk plays
        right after clip ``after`` (at once, if a dropped clip had begun: a cut)."""
        now = time.monotonic()
        dropped = [(e, a) for e, a in self.clips if e["type"] == "clip" and e["index"] > after]
        self.clips = [(e, a) for e, a in self.clips if not (e["type"] == "clip" and e["index"] > after)]
        for event, audio in dropped:
            self.audio_s -= self._seconds(audio)
            self.begins.pop(event["index"], None)
        self.untold = [(i, t) for i, t in self.untold if i <= after]
        for reaction in self.reactions:
            if reaction.index is not None and reaction.index > after:
                reaction.index = reaction.heard = reaction.server_s = None
        if after < 0:
            self.play_end = None
            return
        audio = next(a for e, a in self.clips if e["type"] == "clip" and e["index"] == after)
        end = self.begins[after] + self._seconds(audio)
        if end < now:
            self.cuts += 1
        self.play_end = max(end, now)

    def next_clip(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next clip or tail event, skipping the others."""
        while True:
            event = self.next_event(timeout)
            if event["type"] in ("clip", "tail"):
                return event

    def _schedule(self, event: dict[str, Any], audio: bytes) -> None:
        now = time.monotonic()
        if self.play_end is not None and now > self.play_end:
            self.underruns += 1
        begins = now if self.play_end is None else max(now, self.play_end)
        seconds = self._seconds(audio)
        self.play_end = begins + seconds
        self.audio_s += seconds
        self.clips.append((event, audio))
        if event["type"] != "clip":
            return
        self.begins[event["index"]] = begins
        self.untold.append((event["index"], begins))
        if "prompt_to_ear_s" in event:
            waiting = [
                r for r in self.reactions if r.heard is None and r.prompt == event["end"].get("prompt")
            ]
            if waiting:
                reaction = waiting[-1]
                reaction.index, reaction.heard, reaction.server_s = (
                    event["index"],
                    begins,
                    event["prompt_to_ear_s"],
                )
