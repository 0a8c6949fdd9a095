"""The defaults of a run, in one place: Riffusion's own recipe and its web app's seed image."""

from ...export.specs import HEIGHT, WIDTH

STEPS = 50  # scheduler steps per clip (Riffusion's and its web app's)
SCHEDULER = "pndm"  # Riffusion's scheduler
SEED_IMAGE = "og_beat"  # the web app's seed image: a drum loop this project synthesizes

__all__ = ["HEIGHT", "SCHEDULER", "SEED_IMAGE", "STEPS", "WIDTH"]
