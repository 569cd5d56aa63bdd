"""A real uvicorn server on 127.0.0.1 serving the real all-MiniLM-L6-v2 bundle."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.helpers.server import RunningServer, running_server

TEXTS = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.", "北京是中国的首都"]


@pytest.fixture(scope="module")
def server(minilm_bundle: Path, work_dir: Path) -> Iterator[RunningServer]:
    with running_server(["--model-id", str(minilm_bundle), "--served-model-name", "all-MiniLM-L6-v2"],
                        work_dir / "logs") as running:
        yield running


def _st_vectors(source: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_numpy=True)


def test_openai_sdk_matches_sentence_transformers(server: RunningServer, minilm_source: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    reference = _st_vectors(minilm_source, TEXTS)
    # Left unset, the SDK asks for base64 and decodes it itself; check that path and plain floats.
    for options in ({}, {"encoding_format": "float"}):
        response = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, **options)  # type: ignore[arg-type]
        vectors = np.array([item.embedding for item in response.data], dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
        cosines = (vectors * reference).sum(axis=1) / norms
        assert cosines.min() >= 0.9999
        assert response.model == "all-MiniLM-L6-v2"
        assert response.usage.prompt_tokens > len(TEXTS)
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello", dimensions=128)
    assert len(single.data[0].embedding) == 128
    models = client.models.list()
    assert [model.id for model in models.data] == ["all-MiniLM-L6-v2"]


def test_tei_embed_matches_sentence_transformers(server: RunningServer, minilm_source: Path) -> None:
    vectors = np.array(httpx.post(server.url + "/embed", json={"inputs": TEXTS}, timeout=30).json())
    assert np.allclose(vectors, _st_vectors(minilm_source, TEXTS), atol=1e-4)


async def _concurrent(url: str, texts: list[str]) -> list[list[float]]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        responses = await asyncio.gather(*(client.post("/embed", json={"inputs": text}) for text in texts))
    assert all(response.status_code == 200 for response in responses)
    return [response.json()[0] for response in responses]


def _batch_size_histogram(url: str) -> dict[str, float]:
    metrics = httpx.get(url + "/metrics").text
    return {bucket: float(count) for bucket, count in
            re.findall(r'embedrank_batch_size_bucket\{le="([^"]+)",model="[^"]+"\} ([0-9.e+]+)', metrics)}


def test_200_concurrent_requests_equal_serial_and_share_batches(server: RunningServer) -> None:
    texts = [f"request number {index} about topic {index % 7}" for index in range(200)]
    serial = [httpx.post(server.url + "/embed", json={"inputs": text}, timeout=30).json()[0] for text in texts[:40]]
    before = _batch_size_histogram(server.url)
    concurrent = asyncio.run(_concurrent(server.url, texts))
    after = _batch_size_histogram(server.url)
    assert np.allclose(np.array(concurrent[:40]), np.array(serial), atol=2e-5)
    singles = after["1.0"] - before.get("1.0", 0.0)
    batches = after["+Inf"] - before.get("+Inf", 0.0)
    assert batches > singles, "concurrent requests should have been batched together"
    assert batches < 200


def _gc_collections(url: str) -> dict[str, float]:
    metrics = httpx.get(url + "/metrics").text
    return dict(re.findall(r'^python_gc_collections_total\{generation="(\d)"\} ([0-9.e+]+)$', metrics, re.M))


def test_serving_under_load_runs_no_full_cycle_collection(server: RunningServer) -> None:
    """What loading left is frozen out of the cycle collector and its young threshold is raised, so the
    requests in flight, freed by reference counting, do not set it off (with CPython's defaults 1,000
    requests, 32 at a time, ran several young collections here, and a full one every few thousand)."""
    texts = [f"collector check {index} on topic {index % 11}" for index in range(1024)]

    async def load() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:  # 32 keep-alive connections
            for start in range(0, len(texts), 32):
                batch = [client.post("/embed", json={"inputs": text}) for text in texts[start:start + 32]]
                assert all(response.status_code == 200 for response in await asyncio.gather(*batch))

    before = _gc_collections(server.url)
    asyncio.run(load())
    after = _gc_collections(server.url)
    assert float(after["2"]) == float(before["2"])
    assert float(after["0"]) - float(before["0"]) <= 1


def test_server_process_never_imports_torch(server: RunningServer) -> None:
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "onnxruntime" in maps


def test_health_answers_while_a_long_batch_runs(server: RunningServer) -> None:
    async def scenario() -> float:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            long_inputs = ["word " * 300] * 256
            heavy = asyncio.create_task(client.post("/embed", json={"inputs": long_inputs}))
            await asyncio.sleep(0.05)
            started = asyncio.get_running_loop().time()
            health = await client.get("/health")
            elapsed = asyncio.get_running_loop().time() - started
            assert health.status_code == 200
            assert (await heavy).status_code == 200
            return elapsed

    assert asyncio.run(scenario()) < 0.5


def _counter(url: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_result_cache_answers_repeats_without_a_forward_pass(minilm_bundle: Path, minilm_source: Path,
                                                            work_dir: Path) -> None:
    with running_server(["--model-id", str(minilm_bundle), "--result-cache-size", "64"],
                        work_dir / "logs-cache") as running:
        first = httpx.post(running.url + "/embed", json={"inputs": TEXTS}, timeout=30).json()
        assert np.allclose(first, _st_vectors(minilm_source, TEXTS), atol=1e-4)
        computed = _counter(running.url, "embedrank_batch_size_sum")
        repeats = asyncio.run(_concurrent(running.url, TEXTS * 10))  # single-text requests, through the HTTP lane
        assert _counter(running.url, "embedrank_batch_size_sum") == computed
        assert repeats == [first[index % len(TEXTS)] for index in range(len(repeats))]
        assert _counter(running.url, "embedrank_cache_hits_total") == len(repeats)
        assert _counter(running.url, "embedrank_cache_misses_total") == len(TEXTS)

        # New texts, each sent by ten clients at once: each is computed once, the others wait for it.
        fresh = [f"{text} Again." for text in TEXTS]
        answers = asyncio.run(_concurrent(running.url, fresh * 10))
        assert _counter(running.url, "embedrank_batch_size_sum") == computed + len(fresh)
        assert np.allclose(answers[: len(fresh)], _st_vectors(minilm_source, fresh), atol=1e-4)
        assert answers == answers[: len(fresh)] * 10


def test_clients_that_leave_while_queued_have_their_items_dropped(server: RunningServer) -> None:
    """Eight clients send 16 long texts each behind a long request and close their connections: the
    server notices while they wait and never computes their texts."""
    import socket
    import threading

    host, port = server.url.removeprefix("http://").split(":")
    cancelled = 'embedrank_errors_total{kind="Cancelled"}'
    cancelled_before = _counter(server.url, cancelled)
    tokens_before = _counter(server.url, "embedrank_tokens_total")
    long_text = "word " * 300  # cut to 256 tokens
    heavy_status: list[int] = []
    heavy = threading.Thread(target=lambda: heavy_status.append(
        httpx.post(server.url + "/embed", json={"inputs": [long_text] * 128}, timeout=120).status_code))
    heavy.start()
    time.sleep(0.2)
    body = orjson.dumps({"inputs": [long_text] * 16})
    leavers = [socket.create_connection((host, int(port)), timeout=30) for _ in range(8)]
    for leaver in leavers:
        leaver.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.3)
    for leaver in leavers:
        leaver.close()
    deadline = time.monotonic() + 30
    while _counter(server.url, cancelled) < cancelled_before + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    heavy.join(timeout=120)
    assert heavy_status == [200]
    assert _counter(server.url, cancelled) == cancelled_before + 8
    # Only the long request's texts were computed, none of the 128 the leavers sent.
    assert _counter(server.url, "embedrank_tokens_total") - tokens_before == 128 * 256
    assert httpx.post(server.url + "/embed", json={"inputs": "still serving"}, timeout=30).status_code == 200


def test_pipelined_requests_head_and_expect_continue_on_one_connection(server: RunningServer) -> None:
    """Answers leave through the coalescing transport: each whole, in request order, a HEAD answer
    without a body, and the interim 100 Continue before the final answer."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    bodies = [f'{{"inputs": "{text}"}}'.encode() for text in TEXTS[:3]]
    requests = b"".join(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body) for body in bodies)
    requests += b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n"
    continued = b'{"inputs": "expect"}'
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(requests)
        stream = connection.makefile("rb")

        def answer(has_body: bool = True) -> tuple[int, dict[str, str], bytes]:
            status = int(stream.readline().split()[1])
            headers = {}
            while (line := stream.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            length = int(headers.get("content-length", 0)) if has_body else 0
            return status, headers, stream.read(length)

        for text in TEXTS[:3]:
            status, headers, body = answer()
            expected = httpx.post(server.url + "/embed", json={"inputs": text}, timeout=30).json()
            assert status == 200 and headers["content-type"] == "application/json"
            assert np.allclose(np.array(httpx.Response(200, content=body).json()), expected, atol=1e-6)
        status, headers, body = answer(has_body=False)
        assert status == 200 and body == b"" and "x-request-id" in headers
        connection.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue"
                           b"\r\ncontent-length: %d\r\n\r\n" % len(continued))
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n" and stream.readline() == b"\r\n"
        connection.sendall(continued)
        status, _, body = answer()
        assert status == 200 and len(httpx.Response(200, content=body).json()[0]) == 384


def test_overload_is_refused_with_429(minilm_bundle: Path, work_dir: Path) -> None:
    with running_server(["--model-id", str(minilm_bundle), "--max-concurrent-requests", "2"],
                        work_dir / "logs") as small:
        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=small.url, timeout=60,
                                         limits=httpx.Limits(max_connections=64)) as client:
                return await asyncio.gather(*(client.post("/embed", json={"inputs": ["word " * 200] * 8})
                                              for _ in range(40)))

        responses = asyncio.run(flood())
        statuses = {response.status_code for response in responses}
        assert statuses <= {200, 429} and statuses == {200, 429}
        refused = next(response for response in responses if response.status_code == 429)
        assert refused.json() == {"error": "Model is overloaded", "error_type": "Overloaded"}
        assert refused.headers["retry-after"] == "1"
        assert httpx.post(small.url + "/embed", json={"inputs": "after the flood"}).status_code == 200


def test_bad_settings_fail_at_start(minilm_bundle: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-id", str(minilm_bundle),
                             "--dtype", "float16", "--port", "1", "--max-batch-tokens", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "max_batch_tokens" in result.stderr
    missing_variant = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-id", "/nonexistent"],
                                     capture_output=True, text=True, timeout=60)
    assert missing_variant.returncode == 1 and "embedrank export" in missing_variant.stderr


def test_hugging_face_directory_is_exported_once_then_served(bge_style_source: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "cache"
    args = ["--model-id", str(bge_style_source), "--models-dir", str(models_dir)]
    with running_server(args, tmp_path / "logs", ready_timeout=300) as first:
        vectors = httpx.post(first.url + "/embed", json={"inputs": ["hello there"]}).json()
        assert len(vectors[0]) == 32
    manifest = models_dir / bge_style_source.resolve().name / "manifest.json"
    assert manifest.is_file()
    exported_at = manifest.stat().st_mtime
    with running_server(args, tmp_path / "logs") as second:
        assert httpx.post(second.url + "/embed", json={"inputs": ["hello there"]}).json() == vectors
        assert "exported earlier" in second.output()
    assert manifest.stat().st_mtime == exported_at


def test_sigterm_finishes_accepted_requests_then_exits_0(bge_style_bundle: Path, tmp_path: Path) -> None:
    import signal

    with running_server(["--model-id", str(bge_style_bundle), "--max-batch-tokens", "256", "--engine-workers", "1"],
                        tmp_path / "logs") as live:
        async def scenario() -> list[int]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as client:
                body = {"inputs": ["the capital of france " * 12] * 16}
                tasks = [asyncio.create_task(client.post("/embed", json=body)) for _ in range(60)]
                await asyncio.sleep(1.0)  # every request is sent and accepted; most are still queued
                ready_before = (await client.get("/ready")).status_code
                live.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                responses = await asyncio.gather(*tasks)
                assert ready_before == 200
                return [response.status_code for response in responses]

        statuses = asyncio.run(scenario())
        assert statuses == [200] * 60
        assert live.process.wait(timeout=60) == 0
        assert "shutting down" in live.output()


def test_idle_memory_and_thread_priorities(minilm_bundle: Path, tmp_path: Path) -> None:
    with running_server(["--model-id", str(minilm_bundle), "--lone-pass", "true"], tmp_path) as running:
        pid = running.process.pid
        # fp32 with its lone-pass session (two copies of the weights) stays under 350 MB when ready; the
        # warm-up's widest batch is handed back before the server reports ready, and that batch is no
        # wider than a pass can be on CPU (1024 padded tokens), so start-up stays well below 140 MB above ready
        # (a warm-up of 8 x 512 tokens peaked ~170 MB above)
        assert "a lone batch on" in running.output()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        rss_mb, peak_mb = (int(next(line for line in status if line.startswith(key)).split()[1]) / 1024
                           for key in ("VmRSS", "VmHWM"))
        assert rss_mb < 350, rss_mb
        assert peak_mb - rss_mb < 140, (peak_mb, rss_mb)
        nice = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            name = (task / "comm").read_text().strip()
            nice[task.name] = (name, int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        assert nice[str(pid)][1] == 0  # the event loop
        lowered = [entry for entry in nice.values() if entry[1] == 5]
        assert len(lowered) >= 2, nice  # the batch workers and ONNX Runtime's pool threads


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def test_int8_lone_pass_and_memory_handed_back_when_quiet(minilm_bundle: Path, tmp_path: Path) -> None:
    """int8 with the lone-pass session (two sessions): small when ready; a burst of long batches grows
    RSS, and after a quiet spell it is handed back; a lone request and the same text under concurrent
    load get the same vector (one computed on the wide spinning session, the others on narrow ones)."""
    args = ["--model-id", str(minilm_bundle), "--dtype", "int8", "--lone-pass", "true", "--intra-op-threads", "1",
            "--engine-workers", "2", "--release-memory-idle-seconds", "0.5"]
    with running_server(args, tmp_path) as running:
        pid = running.process.pid
        assert "a lone batch on" in running.output()
        ready_mb = _rss_mb(pid)
        assert ready_mb < 350, ready_mb
        text = "The weather is lovely today."
        lone = np.array(httpx.post(running.url + "/embed", json={"inputs": text}, timeout=30).json()[0])
        long_texts = [" ".join(f"word{index} river mountain" for index in range(150)) + f" {n}" for n in range(32)]

        async def burst() -> list[list[float]]:
            async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
                big = [client.post("/embed", json={"inputs": long_texts}) for _ in range(4)]
                small = [client.post("/embed", json={"inputs": text}) for _ in range(16)]
                answers = await asyncio.gather(*big, *small)
                assert all(answer.status_code == 200 for answer in answers)
                return [answer.json()[0] for answer in answers[4:]]

        loaded = asyncio.run(burst())
        busy_mb = _rss_mb(pid)
        for vector in loaded:
            assert float(np.dot(lone, np.array(vector))) > 0.9999
        assert busy_mb > ready_mb + 40, (ready_mb, busy_mb)  # the burst did grow it (else this proves nothing)
        quiet_mb = busy_mb
        for _ in range(40):  # at most 10 s; the server releases after 0.5 s of quiet
            time.sleep(0.25)
            quiet_mb = _rss_mb(pid)
            if quiet_mb < ready_mb + (busy_mb - ready_mb) / 2:
                break
        assert quiet_mb < ready_mb + (busy_mb - ready_mb) / 2, (ready_mb, busy_mb, quiet_mb)
