"""Prometheus metrics (prometheus-client), fed by the scheduler's observer hooks and the routes.

Names follow vLLM's where one exists (`vllm:` -> `openmedgemma_`), so existing dashboards map over.
Each app has its own registry (several servers can live in one process, as in tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("openmedgemma_requests_running", "Sequences prefilling or decoding", registry=r)
        self.waiting = Gauge("openmedgemma_requests_waiting", "Sequences waiting for a batch slot", registry=r)
        self.batch_size = Histogram("openmedgemma_batch_size", "Sequences decoded per scheduler step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)  # fmt: skip
        self.ttft = Histogram("openmedgemma_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY, registry=r)  # fmt: skip
        self.itl = Histogram("openmedgemma_inter_token_latency_seconds", "Time between two tokens of a sequence",
                             buckets=_LATENCY, registry=r)  # fmt: skip
        self.e2e = Histogram("openmedgemma_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("openmedgemma_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("openmedgemma_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("openmedgemma_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.http = Counter("openmedgemma_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=r)  # fmt: skip

    # scheduler observer hooks (called on the scheduler thread)
    def step(self, running: int, waiting: int, batch: int) -> None:
        """running: admitted (prefilling or decoding); batch: sequences in this step's decode."""
        self.running.set(running)
        self.waiting.set(waiting)
        if batch:
            self.batch_size.observe(batch)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, seq, reason: str, error) -> None:
        import time

        self.e2e.observe(time.perf_counter() - seq.request.arrival)
        self.prompt_tokens.inc(seq.prompt_tokens)
        self.generation_tokens.inc(seq.new_tokens)
        self.requests.labels("error" if error else reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
