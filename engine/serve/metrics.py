"""The server's Prometheus metrics (one registry per server) and the latency buckets a
server and a cluster's ingress share."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency buckets (seconds), at a server and at a cluster's ingress.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "riffusion_requests",
            "Inference requests answered, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "riffusion_request_seconds",
            "Inference request latency, arrival to answer",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "riffusion_queue_depth", "Requests waiting or running", registry=self.registry
        )
        self.batch_size = Histogram(
            "riffusion_batch_size",
            "Requests per engine batch",
            buckets=tuple(range(1, max_batch + 1)),
            registry=self.registry,
        )
        self.steps = Histogram(
            "riffusion_inference_steps",
            "Scheduler steps run per answered request (fewer than asked when degraded)",
            buckets=(1, 2, 4, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100, 250, 1000),
            registry=self.registry,
        )
        self.degraded = Counter(
            "riffusion_degraded_requests",
            "Requests run with fewer steps than asked to meet the timeout (--degrade-steps)",
            registry=self.registry,
        )
        self.streams_open = Gauge("riffusion_streams_open", "Streams open", registry=self.registry)
        self.streams_refused = Counter(
            "riffusion_streams_refused",
            "Streams refused: the server's limit was reached",
            registry=self.registry,
        )
        self.stream_clips = Counter("riffusion_stream_clips", "Clips sent to streams", registry=self.registry)
        self.stream_audio_bytes = Counter(
            "riffusion_stream_audio_bytes",
            "Audio frame bytes sent to streams, by format (pcm_s16le, opus)",
            ["format"],
            registry=self.registry,
        )
        self.stream_underruns = Counter(
            "riffusion_stream_underruns",
            "Stream clips ready after they were due to start playing",
            registry=self.registry,
        )
        self.stream_margin = Histogram(
            "riffusion_stream_margin",
            "A stream's real-time margin at each clip: audio seconds made per wall second (>= 1 keeps up)",
            buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20),
            registry=self.registry,
        )
        self.stream_prompt_to_ear = Histogram(
            "riffusion_stream_prompt_to_ear_seconds",
            "From a stream's prompt message to the client's `played` of the first clip that moves toward it",
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "riffusion_batch_seconds",
            "Engine time per batch",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
