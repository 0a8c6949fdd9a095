"""Measurement and checks over the runtime: ``bench`` (the engine against the reference
pipeline), ``doctor`` (every path this machine can run, against its oracle)."""
