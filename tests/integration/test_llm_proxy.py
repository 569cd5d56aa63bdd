"""The generation proxy against real upstream processes on loopback (a scripted OpenAI-compatible
server): pass-through, streaming as it arrives, pools, failures, security, metrics."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.server import RunningServer, free_port, running_server
from tests.helpers.upstreams import Upstream, stub_upstream

CLIENT_KEY = "client-secret"
UPSTREAM_KEY = "upstream-secret"


@dataclass
class Setup:
    server: RunningServer
    stub: Upstream
    mortal: Upstream
    dead_port: int
    logs: Path

    def client(self, **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=CLIENT_KEY, max_retries=0,
                             **options)  # type: ignore[arg-type]

    def post(self, path: str, body: object, request_id: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-request-id": request_id or uuid.uuid4().hex}
        return httpx.post(self.server.url + path, json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    logs = tmp_path_factory.mktemp("proxy")
    dead_port, dead_port_2 = free_port(), free_port()
    with stub_upstream(logs) as stub, stub_upstream(logs) as mortal:
        config = {"upstream": [
            {"name": "stub", "url": stub.url, "model": "stub-upstream-model", "aliases": ["gpt-stub"],
             "api_key_env": "STUB_KEY"},
            {"name": "pool", "urls": [f"http://127.0.0.1:{dead_port}/v1", stub.url]},
            {"name": "down", "url": f"http://127.0.0.1:{dead_port_2}"},
            {"name": "slow", "url": stub.url, "read_timeout": 1},
            {"name": "mortal", "url": mortal.url},
        ]}
        config_file = logs / "upstreams.json"
        config_file.write_text(json.dumps(config))
        args = ["--llm-config", str(config_file), "--api-key", CLIENT_KEY, "--llm-health-check-seconds", "0.3",
                "--llm-max-response-bytes", "8192", "--llm-connect-timeout", "2"]
        with running_server(args, logs, env={"STUB_KEY": UPSTREAM_KEY}) as server:
            yield Setup(server, stub, mortal, dead_port, logs)


def test_chat_and_completions_pass_through_with_the_openai_sdk(setup: Setup) -> None:
    client = setup.client()
    chat = client.chat.completions.create(model="gpt-stub", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "stub reply"
    assert chat.usage is not None and chat.usage.total_tokens == 9
    completion = client.completions.create(model="stub", prompt="Once upon a time")
    assert completion.choices[0].text == "stub reply"
    seen = setup.stub.events()[-2:]
    assert [event["path"] for event in seen] == ["/v1/chat/completions", "/v1/completions"]
    # the alias was rewritten to the upstream's own model name
    assert {event["model"] for event in seen} == {"stub-upstream-model"}


def test_the_clients_key_never_reaches_the_upstream(setup: Setup) -> None:
    request_id = uuid.uuid4().hex
    assert setup.post("/v1/chat/completions", {"model": "stub", "messages": []}, request_id).status_code == 200
    event = setup.stub.event(request_id)  # the request id travels upstream too
    assert event["authorization"] == f"Bearer {UPSTREAM_KEY}"
    other = uuid.uuid4().hex
    assert setup.post("/v1/chat/completions", {"model": "slow", "messages": []}, other).status_code == 200
    assert setup.stub.event(other)["authorization"] is None  # no key configured for that upstream: none sent
    # and without the server's own key nothing is forwarded at all
    refused = httpx.post(setup.server.url + "/v1/chat/completions", json={"model": "stub", "messages": []})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_streaming_arrives_chunk_by_chunk_before_the_upstream_finishes(setup: Setup) -> None:
    request_id = uuid.uuid4().hex
    client = setup.client(default_headers={"x-request-id": request_id})
    arrivals, texts = [], []
    stream = client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, extra_body={"stub": {"chunks": 8, "interval": 0.2}})
    for chunk in stream:
        if chunk.choices:
            arrivals.append(time.time())
            texts.append(chunk.choices[0].delta.content)
    event = setup.stub.event(request_id)
    assert texts == [f"tok{number} " for number in range(8)]
    finished = float(event["finished_at"])  # type: ignore[arg-type]
    # the first chunk was in the client's hands about 1.4 s before the upstream sent its last one
    assert arrivals[0] < finished - 1.0, (arrivals[0], finished)
    delays = sorted(arrival - float(event[f"sent_{number}"]) for number, arrival in enumerate(arrivals))  # type: ignore[arg-type]
    assert delays[len(delays) // 2] < 0.05, delays  # median added delay per chunk


def test_streamed_completions_and_usage_metrics(setup: Setup) -> None:
    client = setup.client()
    stream = client.completions.create(model="stub", prompt="x", stream=True, extra_body={"stub": {"chunks": 3}})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == "tok0 tok1 tok2 "
    metrics = httpx.get(setup.server.url + "/metrics").text
    assert 'embedrank_llm_requests_total{status="200",upstream="stub",url="' in metrics
    assert _value(metrics, 'embedrank_llm_time_to_first_token_seconds_count{upstream="stub"}') >= 1
    assert _value(metrics, 'embedrank_llm_tokens_total{kind="completion",upstream="stub"}') >= 3


def test_unknown_models_are_404_listing_what_is_served(setup: Setup) -> None:
    client = setup.client()
    for name in ("nope", "http://127.0.0.1:1/v1", "all-MiniLM-L6-v2"):
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert "stub" in raised.value.message and "mortal" in raised.value.message
    listed = {model.id for model in client.models.list()}
    assert {"stub", "pool", "down", "slow", "mortal"} <= listed
    for body, message in (([1], "JSON object"), ({"model": "stub"}, "`messages`"),
                          ({"model": "stub", "messages": [], "stream": "yes"}, "`stream`")):
        response = setup.post("/v1/chat/completions", body)
        assert response.status_code == 422 and message in response.json()["error"]["message"]


def test_an_upstream_that_is_down_is_502(setup: Setup) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        setup.client().chat.completions.create(model="down", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502 and "unreachable" in raised.value.message
    assert time.monotonic() - started < 5


def test_an_upstream_that_stalls_is_504(setup: Setup) -> None:
    started = time.monotonic()
    response = setup.post("/v1/chat/completions", {"model": "slow", "messages": [], "stub": {"stall": True}})
    assert response.status_code == 504 and response.json()["error"]["code"] == 504
    assert 0.9 < time.monotonic() - started < 5
    # mid-stream: the chunks already sent stay, then an error event the SDK raises
    stream = setup.client().chat.completions.create(model="slow", messages=[], stream=True,
                                                    extra_body={"stub": {"chunks": 5, "stall_after": 2}})
    assert _deltas_until_error(stream, "stopped sending") == ["tok0 ", "tok1 "]


def test_upstream_client_errors_pass_through(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError, match="stub refused with 400"):
        setup.client().chat.completions.create(model="stub", messages=[], extra_body={"stub": {"status": 400}})
    response = setup.post("/v1/completions", {"model": "stub", "prompt": "x", "stub": {"status": 500}})
    assert response.status_code == 502 and "answered 500" in response.json()["error"]["message"]


def test_response_size_limit(setup: Setup) -> None:
    stream = setup.client().completions.create(model="stub", prompt="x", stream=True,
                                               extra_body={"stub": {"chunks": 200, "interval": 0}})
    with pytest.raises(openai.APIError, match="byte limit"):
        for _ in stream:
            pass


def test_a_client_that_leaves_mid_stream_cancels_the_upstream(setup: Setup) -> None:
    request_id = uuid.uuid4().hex
    body = {"model": "stub", "prompt": "x", "stream": True, "stub": {"chunks": 100, "interval": 0.05}}
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-request-id": request_id}
    with httpx.stream("POST", setup.server.url + "/v1/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    left = time.time()
    deadline = time.monotonic() + 5
    while not (event := setup.stub.event(request_id))["disconnected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert event["disconnected"], event
    assert float(event["disconnected_at"]) - left < 1.0  # type: ignore[arg-type]
    assert int(event["chunks_sent"]) < 30 and not event["finished"]  # type: ignore[call-overload]


def test_a_client_that_leaves_before_a_plain_answer_cancels_the_upstream(setup: Setup) -> None:
    request_id = uuid.uuid4().hex
    body = {"model": "stub", "prompt": "x", "stub": {"delay": 5}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(setup.server.url + "/v1/completions", json=body, timeout=0.5,
                   headers={"authorization": f"Bearer {CLIENT_KEY}", "x-request-id": request_id})
    left = time.time()
    deadline = time.monotonic() + 5
    while not (event := setup.stub.event(request_id))["disconnected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert event["disconnected"] and not event["finished"], event
    assert float(event["disconnected_at"]) - left < 1.0  # type: ignore[arg-type]


def test_an_upstream_dying_mid_stream_ends_the_stream_with_an_error(setup: Setup) -> None:
    stream = setup.client().chat.completions.create(model="mortal", messages=[], stream=True,
                                                    extra_body={"stub": {"chunks": 10, "die_after": 3}})
    assert _deltas_until_error(stream, "mid-stream") == ["tok0 ", "tok1 ", "tok2 "]
    setup.mortal.process.wait(timeout=5)
    # the server is fine, and the dead upstream now answers 502
    assert httpx.get(setup.server.url + "/health").status_code == 200
    assert setup.post("/v1/chat/completions", {"model": "mortal", "messages": []}).status_code == 502


def test_a_pool_with_a_dead_member_still_serves_and_takes_it_back(setup: Setup) -> None:
    for _ in range(6):
        assert setup.post("/v1/chat/completions", {"model": "pool", "messages": []}).status_code == 200
    dead_url = f"http://127.0.0.1:{setup.dead_port}/v1"
    metrics = httpx.get(setup.server.url + "/metrics").text
    assert _value(metrics, f'embedrank_llm_upstream_up{{upstream="pool",url="{dead_url}"}}') == 0
    # the member comes back: the health check finds it and requests reach it again
    with stub_upstream(setup.logs, port=setup.dead_port) as revived:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = httpx.get(setup.server.url + "/metrics").text
            if _value(metrics, f'embedrank_llm_upstream_up{{upstream="pool",url="{dead_url}"}}') == 1:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the revived member was not taken back")
        for _ in range(6):
            assert setup.post("/v1/chat/completions", {"model": "pool", "messages": []}).status_code == 200
        assert len(revived.events()) >= 2  # least-outstanding spreads sequential requests over both


def _deltas_until_error(stream: Iterable[Any], message: str) -> list[str | None]:
    """The streamed deltas received before the stream ended with an error event matching `message`."""
    received = []
    with pytest.raises(openai.APIError, match=message):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    return received


def _value(metrics: str, series: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")
