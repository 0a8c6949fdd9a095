"""The serving surface: Riffusion's HTTP API (``app``), its validation (``api``) and the
queue and batcher (``batcher``). It imports the engine; the engine never imports it."""
