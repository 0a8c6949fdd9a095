"""The serving surface: Riffusion's HTTP API (``app``), its validation (``api``), the
server's limits (``config``), the queue and batcher (``batcher``) around its policy
(``scheduler``), ``/stream`` (``streams``), Prometheus ``metrics``, and the Ray Serve
application (``cluster``). It imports the engine; the engine never imports it."""
