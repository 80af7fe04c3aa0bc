"""Prometheus metrics of one server (their own registry, so several servers in a process are fine)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST as CONTENT_TYPE,
)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

__all__ = ["CONTENT_TYPE", "ServeMetrics"]


class ServeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "llm_requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "llm_rejected_requests",
            "Requests refused (bad input, full queue)",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated", registry=r)
        # prefix caching (prefix_cache_entries > 0): hit rate = hits / queries, in prompt tokens
        self.prefix_queries = Counter(
            "llm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "llm_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache", registry=r
        )
        self.queue_depth = Gauge("llm_queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("llm_active_slots", "Decode slots in use", registry=r)
        self.free_pages = Gauge(
            "llm_free_kv_pages", "Free KV-cache pages (paged cache)", registry=r
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "From request arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llm_inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
