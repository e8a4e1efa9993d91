"""Prometheus metrics named like vLLM's (`vllm:` becomes `lmforge:`), so vLLM dashboards need one rename.

Each server gets its own registry, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    """The server's counters, gauges and histograms, labelled with the served model name."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(name, doc, list(labels), registry=r).labels(**labels)

        def counter(name, doc):
            return Counter(name, doc, list(labels), registry=r).labels(**labels)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, list(labels), buckets=buckets, registry=r).labels(**labels)

        self.running = gauge("lmforge:num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("lmforge:num_requests_waiting", "Requests waiting to be admitted.")
        self.prompt_tokens = counter("lmforge:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("lmforge:generation_tokens", "Generated tokens.")
        self.ttft = histogram("lmforge:time_to_first_token_seconds", "Arrival to first generated token.",
                              LATENCY_BUCKETS)
        self.itl = histogram("lmforge:inter_token_latency_seconds", "Time between consecutive tokens.",
                             TOKEN_BUCKETS)
        self.e2e = histogram("lmforge:e2e_request_latency_seconds", "Arrival to the last token.", LATENCY_BUCKETS)
        self._success = Counter("lmforge:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._model_name = model_name
        self.http = Counter("http_requests", "HTTP responses by handler, method and status.",
                            ["handler", "method", "status"], registry=r)

    def finished(self, reason: str, seconds: float) -> None:
        self._success.labels(model_name=self._model_name, finished_reason=reason).inc()
        self.e2e.observe(seconds)
