"""The request counters and latency histograms the event loop keeps, as Prometheus reads them."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.observability import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_counts_and_cumulative_buckets_as_prometheus_histograms_have_them() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.003, 0.003, 100.0):  # on a bound, between two, twice, past the last
        metrics.requests.observe("/embed", "total", seconds)
    metrics.requests.observe("/rerank", "queue", 0.0)
    for status in (200, 200, 429):
        metrics.requests.count("/embed", "tiny", status)
    samples = _samples(metrics)

    def bucket(bound: str, route: str = "/embed", phase: str = "total") -> float:
        return samples[("embedrank_request_duration_seconds_bucket", (("le", bound), ("phase", phase),
                                                                     ("route", route)))]

    assert bucket("0.001") == 1 and bucket("0.0025") == 1 and bucket("0.005") == 3 and bucket("30.0") == 3
    assert bucket("+Inf") == 4
    totals = (("phase", "total"), ("route", "/embed"))
    assert samples[("embedrank_request_duration_seconds_count", totals)] == 4
    assert abs(samples[("embedrank_request_duration_seconds_sum", totals)] - 100.007) < 1e-9
    assert bucket("0.001", "/rerank", "queue") == 1
    assert samples[("embedrank_requests_total", (("model", "tiny"), ("route", "/embed"), ("status", "200")))] == 2
    assert samples[("embedrank_requests_total", (("model", "tiny"), ("route", "/embed"), ("status", "429")))] == 1
