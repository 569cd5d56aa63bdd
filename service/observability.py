"""Prometheus metrics (one registry per app) and logging setup."""

from __future__ import annotations

import bisect
import contextvars
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from service.batching.batcher import BatchStats

if TYPE_CHECKING:
    from service.core.cache import ResultCache

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)
_LLM_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds; Python GC counts
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = RequestMetrics(self.registry, _SECONDS)
        self.caches = CacheMetrics(self.registry)
        self.batch_size = Histogram("embedrank_batch_size", "Items per forward pass", ["model"],
                                    buckets=_BATCH_SIZES, registry=self.registry)
        self.batch_tokens = Histogram("embedrank_batch_tokens", "Padded tokens per forward pass", ["model"],
                                      buckets=_TOKENS, registry=self.registry)
        self.batch_seconds = Histogram("embedrank_batch_inference_seconds", "Forward pass time", ["model"],
                                       buckets=_SECONDS, registry=self.registry)
        self.queue_depth = Gauge("embedrank_queue_depth", "Items waiting for a forward pass", ["model"],
                                 registry=self.registry)
        self.tokens = Counter("embedrank_tokens_total", "Real (unpadded) tokens processed", ["model"],
                              registry=self.registry)
        self.padding = Counter("embedrank_padding_tokens_total", "Padding tokens computed", ["model"],
                               registry=self.registry)
        self.errors = Counter("embedrank_errors_total", "Errors by kind", ["kind"], registry=self.registry)
        # generation proxy, per upstream (served name) and, where it matters, per pool member URL
        self.llm_requests = Counter("embedrank_llm_requests_total", "Requests forwarded, by upstream, member "
                                    "URL and upstream status (499: client left)", ["upstream", "url", "status"],
                                    registry=self.registry)
        self.llm_errors = Counter("embedrank_llm_errors_total", "Upstream failures by kind (connect, timeout, "
                                  "protocol, upstream)", ["upstream", "kind"], registry=self.registry)
        self.llm_seconds = Histogram("embedrank_llm_request_duration_seconds", "Forwarded request time, to the "
                                     "last byte", ["upstream"], buckets=_LLM_SECONDS, registry=self.registry)
        self.llm_first_token = Histogram("embedrank_llm_time_to_first_token_seconds", "Time to the first "
                                         "streamed bytes from the upstream", ["upstream"], buckets=_LLM_SECONDS,
                                         registry=self.registry)
        self.llm_tokens = Counter("embedrank_llm_tokens_total", "Tokens reported in upstream `usage`",
                                  ["upstream", "kind"], registry=self.registry)
        self.llm_up = Gauge("embedrank_llm_upstream_up", "1 while a pool member takes requests, 0 while it is "
                            "out after connection errors", ["upstream", "url"], registry=self.registry)

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        self.batch_size.labels(model).observe(stats.size)
        self.batch_tokens.labels(model).observe(stats.padded_tokens)
        self.batch_seconds.labels(model).observe(stats.seconds)
        self.queue_depth.labels(model).set(stats.queue_depth)
        self.tokens.labels(model).inc(stats.real_tokens)
        self.padding.labels(model).inc(stats.padded_tokens - stats.real_tokens)


class RequestMetrics:
    """`embedrank_requests_total{route,model,status}` and `embedrank_request_duration_seconds{route,phase}`,
    kept as plain numbers and handed to Prometheus when it scrapes.

    Every request adds one count and up to four latencies. prometheus_client's own counter and histogram take
    a lock for each value they change (ten a request here); these are only ever changed and read on the event
    loop's thread (the request observer writes them, /metrics is served there), so they need none.
    """

    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._bounds = [repr(float(bound)) for bound in buckets] + ["+Inf"]  # Prometheus's `le` labels
        self._counts: dict[tuple[str, str, str], int] = {}
        # per (route, phase): observations in each bucket (not cumulative; the last is +Inf), then their sum
        self._histograms: dict[tuple[str, str], list[float]] = {}
        registry.register(self)

    def count(self, route: str, model: str, status: int) -> None:
        key = (route, model, str(status))
        self._counts[key] = self._counts.get(key, 0) + 1

    def observe(self, route: str, phase: str, seconds: float) -> None:
        histogram = self._histograms.get((route, phase))
        if histogram is None:
            histogram = self._histograms[(route, phase)] = [0.0] * (len(self.buckets) + 2)
        histogram[bisect.bisect_left(self.buckets, seconds)] += 1  # the first bucket whose bound is >= seconds
        histogram[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("embedrank_requests", "Requests by route, model and status code",
                                       labels=["route", "model", "status"])
        for counted, value in list(self._counts.items()):
            requests.add_metric(list(counted), value)
        yield requests
        durations = HistogramMetricFamily("embedrank_request_duration_seconds", "Request latency by phase",
                                          labels=["route", "phase"])
        for observed, histogram in list(self._histograms.items()):
            cumulative = itertools.accumulate(histogram[:-1])
            durations.add_metric(list(observed), list(zip(self._bounds, cumulative, strict=True)), histogram[-1])
        yield durations


class CacheMetrics:
    """`embedrank_cache_hits_total`, `embedrank_cache_misses_total` and `embedrank_cache_entries` per model,
    read from each model's result cache (--result-cache-size) when Prometheus scrapes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.caches: dict[str, ResultCache] = {}  # served model name -> its cache
        registry.register(self)

    def add(self, model: str, cache: ResultCache) -> None:
        self.caches[model] = cache

    def collect(self) -> Iterator[Metric]:
        if not self.caches:  # the cache is off: no families to show
            return
        hits = CounterMetricFamily("embedrank_cache_hits", "Inputs answered from the result cache", labels=["model"])
        misses = CounterMetricFamily("embedrank_cache_misses", "Inputs looked up in the result cache and not found",
                                     labels=["model"])
        entries = GaugeMetricFamily("embedrank_cache_entries", "Results held in the result cache", labels=["model"])
        for model, cache in list(self.caches.items()):
            hits.add_metric([model], cache.hits)
            misses.add_metric([model], cache.misses)
            entries.add_metric([model], len(cache))
        yield hits
        yield misses
        yield entries


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Request ids: a random per-process prefix and a counter, unique across restarts and replicas without a
# random-number syscall per request (uuid4 cost about a tenth of the event loop's time under a flood).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def request_id_for(given: str) -> str:
    """The request's id: the client's X-Request-ID when it is a sensible one, else a new one."""
    return given if 0 < len(given) <= 128 and given.isprintable() else f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class RequestIdFilter(logging.Filter):
    """Stamps every log record with the id of the request being handled (or "-")."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname, "target": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def setup_tracing(app: Any, endpoint: str, service_name: str) -> None:
    """Export a span per request (OTLP over gRPC) when OpenTelemetry is installed (the otel extra)."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise RuntimeError("--otlp-endpoint needs OpenTelemetry: pip install 'embedrank[otel]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="health,metrics")
    app.state.tracer_provider = provider
