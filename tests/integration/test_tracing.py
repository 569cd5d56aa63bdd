"""OpenTelemetry: a real server exports request spans to a collector on 127.0.0.1 (OTLP over gRPC)."""

from __future__ import annotations

import signal
import threading
from concurrent import futures
from pathlib import Path

import httpx


def test_request_spans_reach_the_collector(bge_style_bundle: Path, tmp_path: Path) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from tests.helpers.server import free_port, running_server

    received: list[str] = []
    arrived = threading.Event()

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    received.extend(span.name for span in scope_spans.spans)
            arrived.set()
            return trace_service_pb2.ExportTraceServiceResponse()

    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        args = ["--model-id", str(bge_style_bundle), "--otlp-endpoint", f"127.0.0.1:{port}",
                "--otlp-service-name", "embedrank-test"]
        with running_server(args, tmp_path / "logs") as live:
            for _ in range(3):
                assert httpx.post(live.url + "/embed", json={"inputs": "trace me"}).status_code == 200
            live.process.send_signal(signal.SIGTERM)  # shutdown flushes the batched spans
            assert live.process.wait(timeout=60) == 0
        assert arrived.wait(10), "no spans arrived"
        assert any("/embed" in name for name in received), received
    finally:
        server.stop(0)
