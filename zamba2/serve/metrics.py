"""The server's Prometheus metrics (`GET /metrics`), one registry per server so that several servers (tests) can
live in one process. The engine thread observes tokens and latencies, the HTTP middleware requests by status;
prometheus_client's metrics are thread-safe."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: a cached or short prompt's first token takes milliseconds, a 4K-token prompt on a CPU seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zamba2_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("zamba2_prompt_tokens", "prompt tokens admitted", registry=r)
        self.prefilled_tokens = Counter("zamba2_prefilled_tokens", "prompt tokens run through the model (the rest "
                                        "came from the prefix cache)", registry=r)
        self.generated_tokens = Counter("zamba2_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("zamba2_time_to_first_token_seconds", "from submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("zamba2_inter_token_latency_seconds", "between a row's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.speculative_steps = Counter("zamba2_speculative_steps", "forwards of a row alone that checked a "
                                         "drafter's proposals (--draft, --prompt-lookup)", registry=r)
        self.speculative_proposed = Counter("zamba2_speculative_proposed_tokens", "tokens the drafter proposed",
                                            registry=r)
        self.speculative_accepted = Counter("zamba2_speculative_accepted_tokens", "proposed tokens the model kept: "
                                            "1 + accepted / steps tokens per forward", registry=r)
        self.queue_depth = Gauge("zamba2_queue_depth", "requests waiting for a row", registry=r)
        self.running = Gauge("zamba2_running_rows", "rows decoding or prefilling", registry=r)
        self.cache_lookups = Counter("zamba2_prefix_cache_lookups", "prompts looked up in the prefix cache",
                                     registry=r)
        self.cache_hits = Counter("zamba2_prefix_cache_hits", "lookups that restored a cached state", registry=r)
        self.cache_bytes = Gauge("zamba2_prefix_cache_bytes", "bytes held by the prefix cache", registry=r)
        self.cache_snapshots = Gauge("zamba2_prefix_cache_snapshots", "cached states", registry=r)

    def watch(self, queued: Callable[[], int], running: Callable[[], int]) -> None:
        """Gauges read when scraped, from the engine's own counts."""
        self.queue_depth.set_function(queued)
        self.running.set_function(running)

    def text(self) -> bytes:
        return generate_latest(self.registry)
