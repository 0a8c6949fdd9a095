"""The defaults of a run, in one place: Riffusion's own recipe and its web app's seed image."""

from ...export.specs import HEIGHT, WIDTH

STEPS = 50  # scheduler steps per clip (Riffusion's and its web app's)
SCHEDULER = "pndm"  # Riffusion's scheduler
SEED_IMAGE = "og_beat"  # the web app's seed image: a drum loop this project synthesizes
# The sizes a model source runs without being told more (an export's are its profile's):
# a typo must not allocate the machine away.
MAX_WIDTH = 2048  # widest clip, pixels (20.48 s); load(max_width=...) and --max-width raise it
MAX_BATCH = 16  # most clips one call denoises on the torch backend

__all__ = ["HEIGHT", "MAX_BATCH", "MAX_WIDTH", "SCHEDULER", "SEED_IMAGE", "STEPS", "WIDTH"]
