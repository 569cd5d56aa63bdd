"""Generation proxy benchmark: what embedrank adds in front of an LLM server, against a direct
connection measured in the same run.

1. Time to first streamed chunk, direct vs through the proxy (sequential streams), and the delay
   each chunk gains on its way (arrival at the client minus the upstream's send time, same clock).
2. N concurrent streams through the proxy: every chunk of every stream must arrive, in order.
3. Optionally the same first-chunk comparison against llama.cpp's server (--llama-python PATH, the
   Python of a venv with llama-cpp-python, e.g. .venv-llama/bin/python after `make llama-backend`).

The upstream for 1 and 2 is the scripted OpenAI-compatible server in tests/helpers/llm_stub.py: it
answers instantly, so what is measured is the proxy, not a model.

    python -m loadtests.proxy [--streams 200] [--samples 300] [--llama-python .venv-llama/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.run import _cpu_name  # noqa: E402
from tests.helpers.server import running_server  # noqa: E402
from tests.helpers.upstreams import llama_cpp_upstream, stub_upstream  # noqa: E402

HERE = Path(__file__).parent


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return {"p50_ms": round(at(0.5), 3), "p90_ms": round(at(0.9), 3), "p99_ms": round(at(0.99), 3)}


async def _stream(client: httpx.AsyncClient, base: str, body: dict[str, Any],
                  request_id: str) -> tuple[float, list[float], int, bool]:
    """(time to first chunk, arrival times, data events, saw [DONE]) of one streamed completion."""
    started = time.perf_counter()
    first = 0.0
    arrivals: list[float] = []
    events = 0
    done = False
    async with client.stream("POST", base + "/completions", json=body,
                             headers={"x-request-id": request_id}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            if '"choices": []' in line:  # the usage chunk
                continue
            now = time.perf_counter()
            first = first or now - started
            arrivals.append(time.time())
            events += 1
    return first, arrivals, events, done


async def first_chunk(base: str, samples: int, chunks: int, interval: float, stub_events: str | None,
                      model: str = "stub", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sequential streams: time to first chunk and (with the stub) per-chunk added delay."""
    ttft: list[float] = []
    chunk_delay: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for sample in range(samples + 5):
            request_id = uuid.uuid4().hex
            body = {"model": model, "prompt": "the", "stream": True, "max_tokens": chunks,
                    "stub": {"chunks": chunks, "interval": interval}, **(extra or {})}
            first, arrivals, _, _ = await _stream(client, base, body, request_id)
            if sample < 5:
                continue  # warm-up: connections, code paths
            ttft.append(first)
            if stub_events is not None and sample % 10 == 0:
                events = (await client.get(stub_events)).json()
                event = next(item for item in events if item["request_id"] == request_id)
                chunk_delay += [arrival - event[f"sent_{number}"] for number, arrival in enumerate(arrivals)]
    result: dict[str, Any] = {"samples": samples, "ttft": _percentiles(ttft)}
    if chunk_delay:
        result["chunk_delay"] = _percentiles(chunk_delay)
    return result


async def concurrent_streams(base: str, streams: int, chunks: int, interval: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        body = {"model": "stub", "prompt": "the", "stream": True, "stub": {"chunks": chunks, "interval": interval}}
        started = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, base, body, uuid.uuid4().hex) for _ in range(streams)),
                                       return_exceptions=True)
        elapsed = time.perf_counter() - started
    failures = [repr(result) for result in results if isinstance(result, BaseException)]
    complete = [result for result in results if not isinstance(result, BaseException)]
    received = sum(result[2] for result in complete)
    return {"streams": streams, "chunks_per_stream": chunks, "interval_s": interval, "seconds": round(elapsed, 2),
            "chunks_expected": streams * chunks, "chunks_received": received,
            "chunks_dropped": streams * chunks - received, "streams_failed": len(failures),
            "streams_without_done": sum(1 for result in complete if not result[3]),
            "ttft": _percentiles([result[0] for result in complete]) if complete else {},
            "failures": failures[:5]}


def run(streams: int, samples: int, llama_python: Path | None, output: Path) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    report: dict[str, Any] = {"machine": {"cpu": _cpu_name(),
                                          "cores": os.cpu_count(), "python": platform.python_version()}}
    with stub_upstream(scratch) as stub, \
            running_server(["--llm", f"stub={stub.url}", "--log-requests", "false"], scratch) as server:
        events = stub.url.removesuffix("/v1") + "/events"
        proxied = server.url + "/v1"
        report["first_chunk_stub"] = {
            "direct": asyncio.run(first_chunk(stub.url, samples, 20, 0.002, events)),
            "proxied": asyncio.run(first_chunk(proxied, samples, 20, 0.002, events)),
        }
        direct, via = report["first_chunk_stub"]["direct"], report["first_chunk_stub"]["proxied"]
        report["first_chunk_stub"]["added_ttft_p50_ms"] = round(via["ttft"]["p50_ms"] - direct["ttft"]["p50_ms"], 3)
        report["first_chunk_stub"]["added_chunk_delay_p50_ms"] = round(
            via["chunk_delay"]["p50_ms"] - direct["chunk_delay"]["p50_ms"], 3)
        report["concurrent"] = asyncio.run(concurrent_streams(proxied, streams, 50, 0.02))
    if llama_python is not None:
        os.environ["EMBEDRANK_LLAMA_PYTHON"] = str(llama_python)
        with llama_cpp_upstream(scratch) as llama, \
                running_server(["--llm", f"tiny-llama={llama.url}", "--log-requests", "false"], scratch) as server:
            bias = {"logit_bias": {"2": -100}}
            direct = asyncio.run(first_chunk(llama.url, 50, 8, 0, None, "tiny-llama", bias))
            via = asyncio.run(first_chunk(server.url + "/v1", 50, 8, 0, None, "tiny-llama", bias))
            report["first_chunk_llama_cpp"] = {"direct": direct, "proxied": via, "added_ttft_p50_ms": round(
                via["ttft"]["p50_ms"] - direct["ttft"]["p50_ms"], 3)}
    output.mkdir(parents=True, exist_ok=True)
    (output / "proxy.json").write_text(json.dumps(report, indent=2))
    (output / "proxy.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores.", "",
             "| upstream | path | TTFT p50 | p90 | p99 | chunk delay p50 | p99 |", "|---|---|---|---|---|---|---|"]
    for key, label in (("first_chunk_stub", "scripted stub"), ("first_chunk_llama_cpp", "llama.cpp (tiny)")):
        if key not in report:
            continue
        for path in ("direct", "proxied"):
            entry = report[key][path]
            delay = entry.get("chunk_delay", {})
            ttft = entry["ttft"]
            lines.append(f"| {label} | {path} | {ttft['p50_ms']} ms | {ttft['p90_ms']} ms | {ttft['p99_ms']} ms | "
                         f"{delay.get('p50_ms', '-')} ms | {delay.get('p99_ms', '-')} ms |")
        lines.append(f"| {label} | **added** | **{report[key]['added_ttft_p50_ms']} ms** | | | "
                     f"{report[key].get('added_chunk_delay_p50_ms', '-')} ms | |")
    concurrent = report["concurrent"]
    lines += ["", f"{concurrent['streams']} concurrent streams x {concurrent['chunks_per_stream']} chunks "
              f"({concurrent['interval_s'] * 1000:.0f} ms apart) through the proxy: "
              f"{concurrent['chunks_received']}/{concurrent['chunks_expected']} chunks received, "
              f"{concurrent['chunks_dropped']} dropped, {concurrent['streams_failed']} streams failed, "
              f"{concurrent['streams_without_done']} without [DONE]; TTFT p50 {concurrent['ttft'].get('p50_ms')} ms, "
              f"p99 {concurrent['ttft'].get('p99_ms')} ms; {concurrent['seconds']} s in all."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (default 200)")
    parser.add_argument("--samples", type=int, default=300, help="sequential streams per path (default 300)")
    parser.add_argument("--llama-python", type=Path, default=None, help="Python of a venv with llama-cpp-python")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    report = run(args.streams, args.samples, args.llama_python, args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
