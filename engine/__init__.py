"""The runtime and the applications on it: ``runtime`` (backends, the chain, loading),
``stream`` (endless joined clips), ``serve`` (HTTP, scheduler, Ray), ``cli`` (one module
per command) and ``tools`` (bench, doctor). Imports ``export`` and ``kernels``, never the
reverse."""
