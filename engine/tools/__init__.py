"""Measurement and checks over the runtime: ``bench`` (the engine against the reference
pipeline), ``doctor`` (every path this machine can run, against its oracle), both over
``reference`` (the reference implementations, shared with the tests) and ``measure``
(timing and statistics, shared with the benchmark scripts)."""
